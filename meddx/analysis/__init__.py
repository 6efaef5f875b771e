"""What is read from results after a run: evaluation against labels,
calibration, Grad-CAM explanations, score drift, plots and the HTML page of a night.

It may read OUT (``meddx.store``), inputs and checkpoints (``meddx.model``); it must not
import pipelines, PACS output or the command line.
"""
