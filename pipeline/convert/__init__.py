"""PyTorch -> ONNX (checked against PyTorch) -> TFLite with onnx2tf (fp32, fp16, full-integer int8)."""
