"""Nuclei of dark-field images as instance labels, by translation (``docs/usage.md``, "Nuclei").

``segment`` finds nuclei in H&E (colour deconvolution and a watershed, nothing downloaded);
``find`` stains a dark-field image and segments the virtual H&E (the adaptation path). No Qt here.
"""
