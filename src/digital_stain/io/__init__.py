"""Files: images in and out, model files, what we may overwrite, multiscale stores."""
