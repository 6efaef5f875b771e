"""The networks and what runs them: the architecture registry and ``Checkpoint``,
the predictor actor, precision policy and its gates, the OpenVINO artefact and the
choice of runtime, the int8 optimizer, out-of-distribution scoring and the metrics
(AUROC and the like) that models are judged by.

It may read checkpoints through ``meddx.inputs.storage`` and turn decoded images into
model input through ``meddx.imaging``; it must not import pipelines, the output store,
the analysis tools, PACS output or the command line.
"""
