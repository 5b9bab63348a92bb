"""Stage `export`: the pruned, fine-tuned model to ONNX, checked against PyTorch."""

from pipeline.stages.export_baseline import ExportStage
from pipeline.stages.finetune import FINETUNE

EXPORT = ExportStage("export", FINETUNE)
