"""The FakeQuantize nodes of a quantized OpenVINO model, found and taken out: a layer
returned to fp32, or only the weights' (or only the activations') quantization kept.
int8_gate.py's tools for asking where a quantized model's score changes come from."""

from __future__ import annotations


def within(model, parts) -> list[str]:
    """The convolutions of the OpenVINO ``model``'s ``parts`` (module names such as
    denseblock4). OpenVINO renames a convolution it folds a following BatchNorm into; such
    a one is known by the ReLU it reads."""
    found = []
    for op in model.get_ops():
        if op.get_type_name() != "Convolution":
            continue
        names = [op.get_friendly_name()]
        names += [i.get_node().get_friendly_name() for i in op.input_values()]
        if any(f".{p}." in n or f".{p}/" in n for n in names for p in parts):
            found.append(op.get_friendly_name())
    return found


def reverting(m, convs_to_revert):
    """A copy of the OpenVINO model ``m`` (with FakeQuantize nodes) in which the given
    convolutions run in fp32: the FakeQuantize nodes that feed them, on activations and on
    weights, are taken out."""
    m = m.clone()
    by_name = {n.get_friendly_name(): n for n in m.get_ops()}
    for name in convs_to_revert:
        for fq in feeding_fqs(by_name[name]):
            fq.output(0).replace(fq.input_value(0))
    m.validate_nodes_and_infer_types()
    return m


def feeding_fqs(op):
    """The FakeQuantize nodes on ``op``'s inputs, looking through shape-only ops."""
    found = []
    for v in op.input_values():
        node = v.get_node()
        while node.get_type_name() in ("Convert", "Reshape", "Transpose", "Unsqueeze"):
            node = node.input_value(0).get_node()
        if node.get_type_name() == "FakeQuantize":
            found.append(node)
    return found


def quantized_convs(m) -> list[str]:
    return [
        op.get_friendly_name()
        for op in m.get_ops()
        if op.get_type_name() in ("Convolution", "MatMul") and feeding_fqs(op)
    ]


def on_weights(fq) -> bool:
    """Whether the FakeQuantize ``fq`` quantizes a constant (weights), looking through
    shape-only ops and conversions."""
    node = fq.input_value(0).get_node()
    while node.get_type_name() in ("Convert", "Reshape", "Transpose", "Unsqueeze", "Multiply"):
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant"


def keeping_only(m, weights: bool):
    """A copy of ``m`` with only its weights' (or only its activations') FakeQuantize
    nodes left: which of the two the score changes come from."""
    m = m.clone()
    fqs = [n for n in m.get_ops() if n.get_type_name() == "FakeQuantize"]
    dropped = [fq for fq in fqs if on_weights(fq) != weights]
    for fq in dropped:
        fq.output(0).replace(fq.input_value(0))
    m.validate_nodes_and_infer_types()
    print(f"  {len(fqs) - len(dropped)} of {len(fqs)} FakeQuantize nodes kept", flush=True)
    return m
