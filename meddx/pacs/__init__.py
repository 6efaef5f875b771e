"""DICOM networking with a PACS: results back where clinicians look (Structured Reports
and heatmap Secondary Captures built from a run's rows, sent over DICOMweb STOW-RS or
DIMSE C-STORE), and the C-STORE receiver that keeps what a PACS or a modality pushes
(pynetdicom).

It reads a run's committed rows (``meddx.store``) and may draw heatmaps
(``meddx.analysis``); it must not import pipelines or the command line.
"""
