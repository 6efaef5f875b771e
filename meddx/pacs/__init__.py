"""Results back where clinicians look: DICOM Structured Reports and heatmap
Secondary Captures built from a run's rows and sent over DICOMweb (STOW-RS).

It reads a run's committed rows (``meddx.store``) and may draw heatmaps
(``meddx.analysis``); it must not import pipelines or the command line.
"""
