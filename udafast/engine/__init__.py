"""Training and evaluation engines."""
from udafast.engine.evaluation import (  # noqa: F401
    ConfusionMatrix, evaluate_model, format_table, iou_per_class, mean_iou, predict, print_table,
    score_predictions, scores, upsample_logits, write_json,
)
