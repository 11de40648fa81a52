"""Load a single-file SD 1.x / 2.x / SDXL checkpoint (.safetensors, .ckpt) offline, with the configs shipped here."""
from __future__ import annotations

import hashlib
import inspect
import json
import pickle
import re
from pathlib import Path

import torch

from dreamartist.backend import EPSILON, V_PREDICTION, Conditioning
from dreamartist.errors import InputError, ModelError

from .backend import StandaloneBackend, scaled_linear_alphas_cumprod
from .tokenizer import clip_tokenizer

CONFIG_ROOT = Path(__file__).parent / "configs"
UNET_PREFIX = "model.diffusion_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders."
SDXL_BASE_MARK = "conditioner.embedders.1.model.ln_final.weight"  # OpenCLIP-G as the second embedder: the base
SDXL_REFINER_MARK = "conditioner.embedders.0.model.ln_final.weight"  # OpenCLIP-G alone: the refiner
ASSIGN_SUPPORTED = "assign" in inspect.signature(torch.nn.Module.load_state_dict).parameters  # torch >= 2.1


# Training callbacks that the original SD .ckpt files pickle beside the weights; loaded as inert stand-ins.
LIGHTNING_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)


class DiscardedObject:
    """Stands in for a pickled PyTorch Lightning callback; its state is dropped."""

    def __setstate__(self, state: object) -> None:
        pass


def _load_pickle(path: Path) -> object:
    """``torch.load(weights_only=True)``, letting only known Lightning callbacks through, as inert objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # not a zip checkpoint, or a torch without the helper: keep the first error
            needed = set()
        if not needed or not needed <= set(LIGHTNING_GLOBALS):
            raise
        with torch.serialization.safe_globals([(DiscardedObject, name) for name in needed]):
            return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a checkpoint file and its safetensors metadata; ModelError when it is not one."""
    if not path.is_file():
        raise ModelError(f"The checkpoint {path} does not exist.")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
        loaded = _load_pickle(path)
    except MemoryError as error:
        raise ModelError(f"There is not enough memory to load {path.name}.") from error
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error):
            raise ModelError(f"The checkpoint {path.name} holds Python objects besides tensors; "
                             "convert it to .safetensors to load it safely.") from error
        raise ModelError(f"The file {path.name} is not a readable checkpoint.") from error
    except Exception as error:  # every reader raises its own types for truncated or foreign files
        raise ModelError(f"The file {path.name} is not a readable checkpoint ({type(error).__name__}).") from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)} if isinstance(loaded, dict) else {}
    if not tensors:
        raise ModelError(f"The file {path.name} does not hold a Stable Diffusion state dict.")
    return tensors, {}


def detect_family(state_dict: dict[str, torch.Tensor]) -> str:
    """'sd1' (CLIP-L text encoder), 'sd2' (OpenCLIP-H) or 'sdxl' (the base: CLIP-L and OpenCLIP-G); ModelError
    for the SDXL refiner, inpainting models and anything else."""
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if any(key.startswith(SDXL_PREFIX) for key in state_dict):
        if SDXL_REFINER_MARK in state_dict:
            raise ModelError("SDXL refiner checkpoints cannot be trained on or sampled with alone: the refiner has "
                             "no CLIP-L text encoder and only finishes the base model's images; use the SDXL base "
                             "checkpoint (or a model made from it).")
        if SDXL_BASE_MARK not in state_dict:
            raise ModelError("The SDXL checkpoint has no OpenCLIP-G text encoder (conditioner.embedders.1).")
        if conv_in is not None and conv_in.shape[1] != 4:
            raise ModelError(f"SDXL inpainting checkpoints ({conv_in.shape[1]} input channels) are not supported; "
                             "use the SDXL base checkpoint (or a model made from it).")
        return "sdxl"
    if conv_in is None:
        raise ModelError("The file is not a Stable Diffusion 1.x, 2.x or SDXL checkpoint (it has no UNet).")
    if conv_in.shape[1] != 4:
        raise ModelError(f"UNets with {conv_in.shape[1]} input channels (inpainting, depth) are not supported.")
    if any(key.startswith(SD2_TEXT_PREFIX) for key in state_dict):
        return "sd2"
    if any(key.startswith(SD1_TEXT_PREFIX) for key in state_dict):
        return "sd1"
    raise ModelError("The checkpoint has no text encoder weights.")


def read_config(folder: Path, part: str) -> dict:
    """``folder/part/config.json`` (diffusers and transformers config layout)."""
    return json.loads((folder / part / "config.json").read_text(encoding="utf-8"))


def materialize(model: torch.nn.Module, weights: dict[str, torch.Tensor], part: str) -> torch.nn.Module:
    """Load ``weights`` into a model from ``empty_models``; every parameter and persistent buffer must be given."""
    # CLIP's position ids are rebuilt, never read: newer transformers do not save them, and some merged
    # checkpoints carry them damaged (as floats).
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    missing = [key for key in expected if key not in weights]
    if missing:
        raise ModelError(f"The checkpoint lacks {len(missing)} {part} weights (first: {missing[0]}).")
    for key, placeholder in expected.items():
        if weights[key].shape != placeholder.shape:
            raise ModelError(f"The checkpoint's {part} weight {key} has shape {tuple(weights[key].shape)}, "
                             f"expected {tuple(placeholder.shape)}: the model does not match its family.")
    options = {"assign": True} if ASSIGN_SUPPORTED else {}
    model.load_state_dict({key: weights[key] for key in expected}, strict=False, **options)
    for name, buffer in list(model.named_buffers()):
        if name.endswith("position_ids"):
            owner, _, attribute = name.rpartition(".")
            positions = torch.arange(buffer.shape[-1]).expand(buffer.shape).clone()
            setattr(model.get_submodule(owner), attribute, positions)
    leftover = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftover:
        raise ModelError(f"The {part} could not be built from the checkpoint (no value for {leftover[0]}).")
    return model


def text_encoder_weights(state_dict: dict, text_encoder, openclip_prefix: str | None) -> dict[str, torch.Tensor]:
    """A text encoder's weights under the key layout of the installed transformers version: CLIP-L (SD1, SDXL's
    first encoder), or OpenCLIP's layout under ``openclip_prefix`` (SD2, SDXL's second encoder)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if openclip_prefix:
        converted = convert_open_clip_checkpoint(text_encoder, state_dict, prefix=openclip_prefix)
    else:
        converted = convert_ldm_clip_checkpoint(state_dict)
    # transformers 5 dropped the "text_model." level of CLIPTextModel; 4.x keeps it (and so do most files). Keys
    # outside it (the projection of CLIPTextModelWithProjection) stay as they are.
    level = "text_model." if any(key.startswith("text_model.") for key in text_encoder.state_dict()) else ""
    return {level + key.removeprefix("text_model.") if key.startswith("text_model.") else key: value
            for key, value in converted.items()}


def sidecar_prediction(path: Path, metadata: dict[str, str]) -> str | None:
    """The prediction type a webui user declared: a same-named .yaml config or the safetensors model spec."""
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("v", "v_prediction", "epsilon", "eps"):
        return V_PREDICTION if spec.startswith("v") else EPSILON
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        try:
            text = yaml.read_text(errors="replace")
        except OSError as error:
            raise ModelError(f"Cannot read {yaml.name} next to the checkpoint: {error.strerror}.") from None
        v = re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*$", text, re.MULTILINE)
        v = v or re.search(r"denoiser_scaling\.VScaling\b", text)  # an SDXL (sgm) config's v-prediction
        return V_PREDICTION if v else EPSILON
    return None


def probe_v_prediction(backend: StandaloneBackend) -> bool:
    """Whether the UNet predicts v: at t=999 an eps model returns about its input, a v model far less.

    SD 2.x 768-v and 512-base share one architecture, so the weights' behaviour is the only sign (the webui
    decides the same way when no config accompanies the file).
    """
    with torch.no_grad():
        latents = torch.full((1, backend.latent_channels, 8, 8), 0.5)
        context = torch.full((1, 2, backend.unet_model.config.cross_attention_dim), 0.5)
        output = backend.unet(latents, torch.tensor([999]), Conditioning(context=context))
        return (output.cpu() - latents).mean().item() < -1


def file_short_hash(path: Path) -> str:
    """The first 10 hex digits of the file's sha256, as the webui shows a checkpoint's hash."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def empty_models(folder: Path) -> tuple:
    """UNet, VAE and text encoder of a config folder; on the meta device (no memory, no init) where torch allows."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta" if ASSIGN_SUPPORTED else "cpu"):
        unet = UNet2DConditionModel.from_config(read_config(folder, "unet"))
        vae = AutoencoderKL.from_config(read_config(folder, "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(read_config(folder, "text_encoder")))
    return unet, vae, text_encoder


def convert_weights(state_dict: dict[str, torch.Tensor], family: str, unet, vae,
                    text_encoder) -> tuple[dict, dict, dict]:
    """The file's original (ldm) weights renamed into each model's own key layout."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    try:
        return (convert_ldm_unet_checkpoint(state_dict, dict(unet.config)),
                convert_ldm_vae_checkpoint(state_dict, dict(vae.config)),
                text_encoder_weights(state_dict, text_encoder, SD2_TEXT_PREFIX if family == "sd2" else None))
    except (KeyError, IndexError, RuntimeError) as error:
        raise ModelError(f"The checkpoint does not have the layout of an {family.upper()} model.") from error


def load_checkpoint(path: str | Path, *, config_dir: str | Path | None = None, prediction_type: str | None = None,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StandaloneBackend:
    """A StandaloneBackend (SDXLBackend for SDXL) from a local checkpoint file, without the network.

    ``config_dir`` replaces the shipped configs of the detected family (unet/, vae/, text_encoder/,
    scheduler/, and text_encoder_2/ for SDXL, each with a config.json); ``prediction_type`` overrides the detection.
    """
    if prediction_type not in (None, EPSILON, V_PREDICTION):
        raise InputError(f"The prediction type must be '{EPSILON}' or '{V_PREDICTION}', not {prediction_type!r}.")
    path = Path(path)
    state_dict, metadata = read_state_dict(path)
    family = detect_family(state_dict)
    folder = Path(config_dir) if config_dir else CONFIG_ROOT / family
    scheduler = read_config(folder, "scheduler")
    if scheduler.get("beta_schedule") != "scaled_linear":
        raise ModelError(f"The scheduler config in {folder} is not Stable Diffusion's 'scaled_linear' schedule.")
    if family == "sdxl":
        from .sdxl import load_sdxl

        return load_sdxl(path, state_dict, metadata, folder, prediction_type=prediction_type, device=device,
                         dtype=dtype)
    unet, vae, text_encoder = empty_models(folder)
    unet_weights, vae_weights, text_weights = convert_weights(state_dict, family, unet, vae, text_encoder)
    del state_dict
    backend = StandaloneBackend(
        family=family,
        unet=materialize(unet, unet_weights, "UNet"),
        vae=materialize(vae, vae_weights, "VAE"),
        text_encoder=materialize(text_encoder, text_weights, "text encoder"),
        tokenizer=clip_tokenizer(),
        alphas_cumprod=scaled_linear_alphas_cumprod(scheduler["beta_start"], scheduler["beta_end"],
                                                    scheduler["num_train_timesteps"]),
        model_name=path.stem, model_hash=file_short_hash(path), device=device, dtype=dtype,
    )
    declared = prediction_type or sidecar_prediction(path, metadata)
    if declared is None:
        declared = V_PREDICTION if family == "sd2" and probe_v_prediction(backend) else EPSILON
    backend.prediction_type = declared
    return backend
