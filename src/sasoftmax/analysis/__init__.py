"""Analyses of the papers' mechanisms on harness models.

- :mod:`~sasoftmax.analysis.gradient_flow`: gradients reaching the attention logits and q/k projections
  during training (SA-Softmax's claim), as a ``step_hook`` of :func:`sasoftmax.train.train`;
- :mod:`~sasoftmax.analysis.fade`: largest attention weight and attention entropy vs context length
  (SSMax's attention fading);
- :mod:`~sasoftmax.analysis.retrieval`: a synthetic key-retrieval (needle) task trained at one length and
  tested at longer ones (SSMax's key-information retrieval).
"""

from .fade import attention_fade
from .gradient_flow import GradientFlowHook, summarize
from .retrieval import NeedleTask, run_needle

__all__ = ["GradientFlowHook", "NeedleTask", "attention_fade", "run_needle", "summarize"]
