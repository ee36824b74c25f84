"""Channel dependency groups of an ONNX graph and the surgery on them: which output channels of Conv/Gemm layers
travel together through the graph (prune removes them; quantize's weight blocks reorder them)."""
