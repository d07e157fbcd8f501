"""Knowledge distillation: a teacher run's logits guide a small student (``medvision distill``).

The teacher scores every training image once, un-augmented, through *its own* preprocessing; the
logits are cached in the student's run folder (``teacher_logits.npz``, keyed by the teacher's weights
hash and the image paths), so distillation costs little more than training the student, and a resumed
or repeated run does not run the teacher again.

Losses (binary, the cancer logit ``s`` of the student, ``t`` of the teacher, label ``y``):
- soft: ``(1 - a) BCE(s, y) + a T^2 BCE(s / T, sigmoid(t / T))`` (Hinton et al. 2015, for one logit);
- hard: ``(1 - a) BCE(s, y) + a BCE(s, [t > 0])`` (DeiT's hard-label distillation).
With a distillation token (``deit_tiny_distilled_patch16_224``), the teacher term trains the token's own
logit ``d`` instead of ``s``; the served logit is ``(s + d) / 2`` (DeiT, Touvron et al. 2021).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medvision.artifact import sha256_file
from medvision.config import DistillConfig
from medvision.data import ImageRow
from medvision.errors import ConfigError
from medvision.preprocess import Preprocess
from medvision.training.export import load_run
from medvision.training.predict import image_logits

log = logging.getLogger(__name__)
CACHE = "teacher_logits.npz"


def distill_loss(student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, cfg: DistillConfig,
                 pos_weight: torch.Tensor | None = None, dist_token: torch.Tensor | None = None) -> torch.Tensor:
    """The distillation objective for ``(batch, 1)`` student / teacher logits and labels.

    With ``dist_token`` (DeiT's distillation-token logit) the labels train ``student`` and the teacher
    trains the token, instead of both terms acting on one logit.
    """
    guided_on = student if dist_token is None else dist_token
    hard = F.binary_cross_entropy_with_logits(student, labels, pos_weight=pos_weight)
    if cfg.mode == "hard":
        guided = F.binary_cross_entropy_with_logits(guided_on, (teacher > 0).float(), pos_weight=pos_weight)
    else:
        temp = cfg.temperature
        guided = temp * temp * F.binary_cross_entropy_with_logits(guided_on / temp, torch.sigmoid(teacher / temp))
    return (1 - cfg.alpha) * hard + cfg.alpha * guided


def teacher_logits(teacher_run: str | Path, rows: list[ImageRow], out_dir: Path, decode, show_progress: bool = True
                   ) -> np.ndarray:
    """The teacher's logit for each of ``rows`` (cached in ``out_dir``); ``decode`` is ``decode_all``'s signature."""
    run = Path(teacher_run)
    tcfg, model, _, ckpt = load_run(run)
    sha = sha256_file(ckpt)
    paths = [str(Path(r.path).resolve()) for r in rows]
    cache = out_dir / CACHE
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["teacher_sha256"]) == sha:
                known = dict(zip(z["paths"].tolist(), z["logits"].tolist(), strict=True))
                if all(p in known for p in paths):
                    log.info("teacher logits for %d images read from %s", len(paths), cache.name)
                    return np.array([known[p] for p in paths])
    pre = Preprocess(tcfg.preprocess)
    images, kept = decode(rows, pre, "decode for the teacher", show_progress)
    if len(kept) != len(rows):
        raise ConfigError(f"the teacher's preprocessing could not read {len(rows) - len(kept)} training image(s)")
    logits = image_logits(model, images, pre)
    np.savez(cache, paths=np.array(paths), logits=logits, teacher_sha256=np.array(sha))
    log.info("teacher %s scored %d training images (cached in %s)", tcfg.model.name, len(paths), cache.name)
    return logits


def teacher_config_check(teacher_run: str | Path) -> None:
    if not (Path(teacher_run) / "best.safetensors").is_file():
        raise ConfigError(f"distill.teacher={teacher_run}: no best.safetensors there (train the teacher first)")


def write_comparison(report: dict, path: Path) -> None:
    """``distill_report.json`` and ``.md``: the distilled student against the same student without a teacher."""
    import json

    path.with_suffix(".json").write_text(json.dumps(report, indent=2))
    ref = next(iter(report["runs"]))
    lines = [f"# Distillation report ({report['subset']} split: {report['images']} images, "
             f"{report['positives']} with cancer)", "",
             "AUROC with patient-clustered bootstrap 95 % intervals; differences are paired (the same resamples "
             f"for both models) against '{ref}'.", "",
             f"| model | AUROC | 95 % CI | minus {ref} | 95 % CI |", "|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        lo, hi = r["auroc_ci95"]
        d = r.get(f"auroc_minus_{ref}")
        dci = r.get(f"auroc_minus_{ref}_ci95")
        lines.append(f"| {name} | {r['auroc']:.3f} | {lo:.3f}–{hi:.3f} | "
                     + (f"{d:+.3f} | {dci[0]:+.3f}–{dci[1]:+.3f} |" if d is not None else "— | — |"))
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
