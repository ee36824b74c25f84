"""How each op treats the channels (axis 1) of the tensors it reads, for the channel-group analysis."""

from __future__ import annotations

# Pool each channel on its own: a zero channel stays zero.
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
# Map each channel to itself, elementwise, with no constant operand to slice.
PASS_THROUGH = {
    "Relu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Celu",
    "Tanh",
    "Identity",
    "Dropout",
    "Abs",
    "Neg",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Softplus",
    "Softsign",
    "Erf",
    "Gelu",
    "Mish",
    "ThresholdedRelu",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Cast",
    "Clip",
    "Sin",
    "Cos",
} | POOLS
# Elementwise with broadcasting: tracked operands join one group, per-channel constants are sliced.
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"}
# Map an exact 0 to an exact 0 and anything else to "unknown" in the dead-channel lattice
# (the piecewise-linear ops are evaluated exactly instead: see dead_channels).
ZERO_PRESERVING = POOLS | {
    "Tanh",
    "Softsign",
    "Erf",
    "Gelu",
    "Elu",
    "Selu",
    "Celu",
    "Sqrt",
    "Sin",
    "Resize",
    "Upsample",
}
