"""Stage `convert`: the pruned, fine-tuned model to TFLite in every precision the profile asks for."""

from pipeline.stages.convert_baseline import ConvertStage
from pipeline.stages.export import EXPORT

CONVERT = ConvertStage("convert", EXPORT, lambda t: tuple(t.quantize.precisions))
