"""``LPSAM``: adapted SAM image encoder + SAM prompt encoder/mask decoder + latent prompt engine."""

from __future__ import annotations

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam
from torch import nn

from anaus_core.lpsam.image_encoder import AdaptedImageEncoder
from anaus_core.lpsam.prompt_engine import LatentPromptEngine
from anaus_core.sam.fast import decode_single_masks, set_attention

ADAPTER_PREFIX = "image_encoder."
ENGINE_PREFIX = "prompt_engine."
DECODER_PREFIX = "mask_decoder."


class LPSAM(nn.Module):
    """LP-SAM. Pixels (B, C, S, S) in 0..255, S = the encoder input size.

    * ``embed(pixels)`` -> (normalised RGB (B, 3, S, S), image embeddings (B, c, S/16, S/16)).
    * ``decode_prompted`` -> SAM's single-mask output for a box and/or point prompt per image
      (stage 1: prompts from the ground truth).
    * ``forward(pixels)`` -> ``{"logits": (B, K, S/4, S/4), "iou": (B, K)}``: one prompt-free mask
      per class from the latent prompt engine (stage 2, prediction).

    ``batched_decoder=True`` (default) decodes all images x classes in one call of SAM's decoder
    modules (``anaus_core.sam.fast.decode_single_masks``); ``False`` is the reference path:
    segment_anything's ``MaskDecoder.forward`` once per image (it replicates ONE image embedding
    for every prompt it is given), as ``Sam.forward`` does. Both give the same values.
    ``set_fast_path(False)`` selects the reference decoder and segment_anything's attention.
    """

    def __init__(
        self,
        *,
        image_encoder: AdaptedImageEncoder,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        prompt_engine: LatentPromptEngine,
        class_names: list[str],
        batched_decoder: bool = True,
    ) -> None:
        super().__init__()
        if len(class_names) != prompt_engine.num_classes:
            raise ValueError(f"{len(class_names)} class names for {prompt_engine.num_classes} token groups")
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.prompt_engine = prompt_engine
        self.class_names = list(class_names)
        self.batched_decoder = bool(batched_decoder)

    def set_fast_path(self, enabled: bool = True) -> "LPSAM":
        """SDPA attention + batched decoder (True) or segment_anything's attention + per-image
        decoder (False, the reference). Weights untouched; returns self."""
        set_attention(self, "sdpa" if enabled else "reference")
        self.batched_decoder = bool(enabled)
        return self

    @property
    def image_size(self) -> int:
        return self.image_encoder.img_size

    @property
    def in_chans(self) -> int:
        return self.image_encoder.normalizer.in_chans

    def embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The normaliser runs in the pixels' precision (fp32); a bf16 model gets bf16 input.
        normalised = self.image_encoder.normalizer(pixels).to(self.image_encoder.vit.patch_embed.proj.weight.dtype)
        return normalised, self.image_encoder.vit(normalised)

    def _no_mask_dense(self, count: int) -> torch.Tensor:
        height, width = self.prompt_encoder.image_embedding_size
        return self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(count, -1, height, width)

    def decode_prompted(
        self,
        embeddings: torch.Tensor,
        *,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt per image, in input-pixel coordinates (x, y).

        boxes (B, 4) xyxy; points (B, P, 2) with point_labels (B, P) (1 = foreground).
        Returns low-res logits (B, 1, S/4, S/4) and predicted IoU (B, 1).
        """
        image_pe = self.prompt_encoder.get_dense_pe()
        if self.batched_decoder:
            point_prompt = None if points is None else (points, point_labels)
            sparse, dense = self.prompt_encoder(points=point_prompt, boxes=boxes, masks=None)
            return decode_single_masks(
                self.mask_decoder,
                image_embeddings=embeddings,
                image_pe=image_pe,
                sparse_prompts=sparse.unsqueeze(1).to(embeddings.dtype),
                dense_prompts=dense.to(embeddings.dtype),
            )
        logits, ious = [], []
        for index in range(embeddings.shape[0]):
            point_prompt = None if points is None else (points[index : index + 1], point_labels[index : index + 1])
            box_prompt = None if boxes is None else boxes[index : index + 1]
            sparse, dense = self.prompt_encoder(points=point_prompt, boxes=box_prompt, masks=None)
            low_res, iou = self.mask_decoder(
                image_embeddings=embeddings[index : index + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            logits.append(low_res)
            ious.append(iou)
        return torch.cat(logits), torch.cat(ious)

    def decode_latent(self, normalised: torch.Tensor, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt-free masks: (B, K, S/4, S/4) logits and (B, K) predicted IoU."""
        image_pe = self.prompt_encoder.get_dense_pe()
        prompts = self.prompt_engine.class_prompts(self.prompt_engine(normalised, embeddings, image_pe))
        if self.batched_decoder:
            no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(embeddings.dtype)
            return decode_single_masks(self.mask_decoder, image_embeddings=embeddings, image_pe=image_pe, sparse_prompts=prompts.to(embeddings.dtype), dense_prompts=no_mask)
        num_classes = prompts.shape[1]
        dense = self._no_mask_dense(num_classes).to(embeddings.dtype)
        logits, ious = [], []
        for index in range(embeddings.shape[0]):
            low_res, iou = self.mask_decoder(
                image_embeddings=embeddings[index : index + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=prompts[index],
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            logits.append(low_res[:, 0])
            ious.append(iou[:, 0])
        return torch.stack(logits), torch.stack(ious)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        normalised, embeddings = self.embed(pixels)
        logits, iou = self.decode_latent(normalised, embeddings)
        return {"logits": logits, "iou": iou}

    # -- parameter groups ----------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What stage 1 trains: adapter tensors (+ the input projection when C not in {1, 3})."""
        return {k: v for k, v in self.state_dict().items() if is_adapter_key(k)}

    def engine_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(ENGINE_PREFIX)}

    def decoder_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(DECODER_PREFIX)}

    def sam_view(self) -> Sam:
        """A segment_anything ``Sam`` sharing this model's adapted encoder, prompt encoder and
        decoder (the prompt engine bypassed), e.g. for ``SamAutomaticMaskGenerator``. Only for
        1- or 3-channel models: SAM's predictor feeds RGB."""
        if self.in_chans not in (1, 3):
            raise ValueError(f"SAM's predictor needs RGB input; this model takes {self.in_chans} channels")
        return Sam(image_encoder=self.image_encoder.vit, prompt_encoder=self.prompt_encoder, mask_decoder=self.mask_decoder).to(
            self.image_encoder.normalizer.pixel_mean.device
        ).eval()


def is_adapter_key(key: str) -> bool:
    return key.startswith(ADAPTER_PREFIX) and (".adapter." in key or key.startswith("image_encoder.normalizer.projection."))
