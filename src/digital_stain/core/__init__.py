"""Maths only: arrays, colour, the enhancer, histograms and adaptation, devices, the networks. No files, no threads."""
