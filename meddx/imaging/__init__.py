"""Pixels: DICOM attributes and frames, decoding PNG, JPEG and DICOM at reduced
resolution, the pixel checks of quality control, and the transforms to a model's input.

The bottom floor of meddx: it works on bytes already in memory, so it must not import
storage, Ray, the model or any other meddx package (only meddx's own errors and
``meddx.names``).
"""
