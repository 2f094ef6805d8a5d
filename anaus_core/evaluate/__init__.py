"""``anaus evaluate``: downstream classification and segmentation of any encoder with a grouped
k-fold protocol that never selects on the test fold (see ``docs/evaluate.md``).

The library never reads image files itself: the caller injects a ``FrameReader`` (the CLI
passes an adapter over the precompute job's readers)."""

from anaus_core.evaluate.config import EvaluateConfig, FinetuneConfig, LinearConfig
from anaus_core.evaluate.encoders import EncoderSpec, load_encoder, parse_encoder_option
from anaus_core.evaluate.reader import Frame, FrameReader
from anaus_core.evaluate.run import run_evaluation

__all__ = ["EncoderSpec", "EvaluateConfig", "FinetuneConfig", "Frame", "FrameReader", "LinearConfig",
           "load_encoder", "parse_encoder_option", "run_evaluation"]
