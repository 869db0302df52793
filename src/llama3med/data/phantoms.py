"""Synthetic abdominal CT/MR phantoms with lesions of known size and place, and questions about them.

Real patient data cannot ship with the project, so the demo model, the training tests and the scale
ablation use these: an axial slice with a body outline, liver, spleen, kidneys and spine, noise, and 0-3
round lesions. Small lesions (a few pixels across at 1152 px) shrink below a pixel in a single 384 px
view; that is where the multi-scale encoder should help.

Every image is a pure function of `(seed, index)`, so a set regenerates bit for bit and a test set drawn
with another seed shares no images with a training set.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..processing.chat import IMAGE_PLACEHOLDER
from ..processing.images import window_values
from .dicom import save_dicom

# Lesion radius as a fraction of the image side; at 1152 px: small 2-5 px, medium 9-17 px, large 29-46 px.
SIZE_CLASSES = {"small": (0.002, 0.004), "medium": (0.008, 0.015), "large": (0.025, 0.04)}
CT_WINDOW = (40.0, 400.0)  # soft tissue
MR_WINDOW = (825.0, 1650.0)  # the DICOM and NIfTI phantoms' default window (the PNGs' range, 0 to 1.1 x lesion)
CT_INTERCEPT = -1024.0
# Mean value of each tissue: Hounsfield units for CT, arbitrary T2-like units for MR.
TISSUE = {
    "CT": {"air": -1000, "fat": -90, "body": 40, "liver": 60, "spleen": 50, "kidney": 35, "bone": 700, "lesion": 5},
    "MR": {"air": 0, "fat": 900, "body": 400, "liver": 300, "spleen": 600, "kidney": 700, "bone": 100, "lesion": 1500},
}
NOISE = {"CT": 8.0, "MR": 25.0}
LESION_ORGANS = ("liver", "spleen", "kidney")
PHANTOM_FORMATS = ("dcm", "png", "nii.gz")


@dataclass
class Lesion:
    organ: str
    x: float  # centre, fraction of the width
    y: float  # centre, fraction of the height
    radius: float  # fraction of the side
    size_class: str

    @property
    def side(self) -> str:
        """Side of the image (not of the patient) the lesion lies on."""
        return "left" if self.x < 0.5 else "right"

    @property
    def box(self) -> list[float]:
        """Bounding box `[x0, y0, x1, y1]` of the disc, in fractions of the image."""
        return [self.x - self.radius, self.y - self.radius, self.x + self.radius, self.y + self.radius]


@dataclass
class Phantom:
    id: str
    modality: str
    values: np.ndarray = field(repr=False)  # physical values (HU for CT), float32, (size, size)
    lesions: list[Lesion]

    @property
    def largest_lesion(self) -> Lesion | None:
        return max(self.lesions, key=lambda lesion: lesion.radius) if self.lesions else None


def _ellipse(size: int, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0) -> np.ndarray:
    """Boolean mask of an ellipse; centre and semi-axes are fractions of the side."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = coords[None, :] - cx, coords[:, None] - cy
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = x * cos + y * sin, -x * sin + y * cos
    return (u / ax) ** 2 + (v / ay) ** 2 <= 1.0


def _organs(rng: np.random.Generator) -> dict[str, list[tuple[float, float, float, float, float]]]:
    """Ellipses `(cx, cy, ax, ay, angle)` of each organ, jittered per phantom. The liver is on the image's
    left (the patient's right, radiological convention)."""

    def j(scale: float = 0.015) -> float:
        return float(rng.uniform(-scale, scale))

    return {
        "liver": [(0.34 + j(), 0.45 + j(), 0.17 + j(0.01), 0.13 + j(0.01), 0.3 + j(0.2))],
        "spleen": [(0.70 + j(), 0.40 + j(), 0.07 + j(0.005), 0.10 + j(0.005), -0.4 + j(0.2))],
        "kidney": [
            (0.37 + j(0.01), 0.63 + j(0.01), 0.045, 0.07, 0.25),
            (0.63 + j(0.01), 0.63 + j(0.01), 0.045, 0.07, -0.25),
        ],
        "bone": [(0.5, 0.70 + j(0.01), 0.045, 0.045, 0.0)],
    }


def _place_lesions(rng, organ_masks: dict[str, np.ndarray], count: int, size: int) -> list[Lesion]:
    lesions: list[Lesion] = []
    for _ in range(count):
        size_class = str(rng.choice(list(SIZE_CLASSES)))
        radius = float(rng.uniform(*SIZE_CLASSES[size_class]))
        organ = "liver" if size_class == "large" else str(rng.choice(LESION_ORGANS, p=[0.6, 0.2, 0.2]))
        mask = organ_masks[organ]
        ys, xs = np.nonzero(mask)
        for _attempt in range(200):  # a centre whose whole disc lies inside the organ, apart from others
            k = int(rng.integers(len(xs)))
            x, y = (xs[k] + 0.5) / size, (ys[k] + 0.5) / size
            disc = _ellipse(size, x, y, radius, radius)
            apart = all(np.hypot(x - o.x, y - o.y) > radius + o.radius + 0.01 for o in lesions)
            if apart and not (disc & ~mask).any():
                lesions.append(Lesion(organ, x, y, radius, size_class))
                break
    return lesions


def make_phantom(seed: int, index: int, size: int = 1152) -> Phantom:
    """One axial abdominal slice with 0-3 lesions, determined by `(seed, index)`."""
    rng = np.random.default_rng([seed, index])
    modality = "CT" if rng.random() < 0.7 else "MR"
    tissue = TISSUE[modality]
    values = np.full((size, size), tissue["air"], dtype=np.float32)
    body = _ellipse(size, 0.5, 0.52, 0.40 + rng.uniform(-0.03, 0.03), 0.30 + rng.uniform(-0.03, 0.03))
    values[body] = tissue["fat"]
    values[_ellipse(size, 0.5, 0.52, 0.37, 0.27) & body] = tissue["body"]
    masks = {}
    for organ, ellipses in _organs(rng).items():
        masks[organ] = np.zeros((size, size), dtype=bool)
        for cx, cy, ax, ay, angle in ellipses:
            masks[organ] |= _ellipse(size, cx, cy, ax, ay, angle)
        values[masks[organ]] = tissue[organ]
    count = int(rng.choice([0, 1, 2, 3], p=[0.4, 0.3, 0.2, 0.1]))
    lesions = _place_lesions(rng, masks, count, size)
    for lesion in lesions:
        values[_ellipse(size, lesion.x, lesion.y, lesion.radius, lesion.radius)] = tissue["lesion"]
    values += rng.normal(0.0, NOISE[modality], values.shape).astype(np.float32)
    return Phantom(f"phantom-{seed}-{index:06d}", modality, values, lesions)


def phantom_uint8(phantom: Phantom) -> np.ndarray:
    """The slice as a viewer shows it: CT in the soft-tissue window, MR over its full range."""
    if phantom.modality == "CT":
        return window_values(phantom.values, *CT_WINDOW)
    low, high = 0.0, float(TISSUE["MR"]["lesion"]) * 1.1
    return window_values(phantom.values, (low + high) / 2, high - low)


def _stored(phantom: Phantom) -> np.ndarray:
    """The slice's stored values: CT in HU minus the intercept, MR as they are; uint16, as DICOM holds them."""
    offset = CT_INTERCEPT if phantom.modality == "CT" else 0.0
    return np.clip(np.round(phantom.values - offset), 0, 65535).astype(np.uint16)


def save_phantom_dicom(phantom: Phantom, path: Path) -> Path:
    """CT as stored values with the HU rescale and soft-tissue window tags; MR as plain uint16."""
    if phantom.modality == "CT":
        return save_dicom(path, _stored(phantom), modality="CT", slope=1.0, intercept=CT_INTERCEPT, window=CT_WINDOW)
    return save_dicom(path, _stored(phantom), modality="MR", window=MR_WINDOW)


def save_phantom_nifti(phantom: Phantom, path: Path) -> Path:
    """The slice as a one-slice NIfTI volume (`.nii.gz`), as dcm2niix would convert the DICOM: the same
    stored values and HU scaling, the voxels in the DICOM's L, P, S order, and `cal_min`..`cal_max` set to
    the range the DICOM's window shows, so both files load to the same 8-bit image."""
    import nibabel

    centre, width = CT_WINDOW if phantom.modality == "CT" else MR_WINDOW
    voxels = _stored(phantom).astype(np.int16).T[:, :, None]  # (columns, rows, 1): towards L, P, S
    volume = nibabel.Nifti1Image(voxels, np.diag([-1.0, -1.0, 1.0, 1.0]))  # 1 mm voxels; RAS+ flips L and P
    volume.header.set_slope_inter(1.0, CT_INTERCEPT if phantom.modality == "CT" else 0.0)
    volume.header["cal_min"] = centre - 0.5 - (width - 1) / 2  # DICOM's linear window: these map to 0 and 255
    volume.header["cal_max"] = centre - 0.5 + (width - 1) / 2
    nibabel.save(volume, path)
    return Path(path)


def describe(phantom: Phantom) -> str:
    """A caption in the style of a figure legend (the pretrain stage's target)."""
    modality = "Axial CT" if phantom.modality == "CT" else "Axial T2-weighted MRI"
    if not phantom.lesions:
        return f"{modality} of the abdomen showing no focal lesion."
    parts = [f"a {lesion.size_class} lesion in the {lesion.organ} on the {lesion.side}" for lesion in phantom.lesions]
    noun = "lesion" if len(parts) == 1 else "lesions"
    return f"{modality} of the abdomen showing {len(parts)} focal {noun}: " + "; ".join(parts) + "."


# Each question and other ways of asking it. Training conversations draw a wording per turn, so the model
# answers a question however a user puts it; test sets ask the first wording, so their scores compare.
WORDINGS = {
    ("presence", "CLOSED"): ("Is there a lesion in this image?", "Do you see a lesion?", "Are any lesions present?"),
    ("count", "OPEN"): ("How many lesions are visible?", "How many lesions are there?", "Count the lesions."),
    ("modality", "OPEN"): (
        "What imaging modality is this?",
        "What is the modality of this image?",
        "Which modality was used, CT or MRI?",
    ),
    ("modality", "CLOSED"): ("Is this a CT scan?", "Was this image taken with CT?", "Is this image a CT?"),
    ("size", "OPEN"): (
        "How large is the largest lesion: small, medium or large?",
        "What size is the largest lesion?",
        "Is the largest lesion small, medium or large?",
    ),
    ("organ", "OPEN"): (
        "Which organ contains the largest lesion?",
        "In which organ is the largest lesion?",
        "What organ is the largest lesion in?",
    ),
    ("side", "OPEN"): (
        "On which side of the image is the lesion?",
        "Is the lesion on the left or the right?",
        "Which side of the image is the lesion on?",
    ),
    ("side", "CLOSED"): (
        "Is the lesion on the left side of the image?",
        "Is the lesion on the left?",
        "Does the lesion lie on the left of the image?",
    ),
}
DESCRIBE = "Describe the image."
DESCRIBED_FRACTION = 0.25  # of the slices that also get a description-only conversation


def questions(phantom: Phantom) -> list[dict]:
    """Question-answer pairs with their LLaVA-Med answer type, what they probe and their wordings."""
    modality_name = "CT" if phantom.modality == "CT" else "MRI"
    lesions = phantom.lesions
    qa = [
        ("presence", "CLOSED", "yes" if lesions else "no"),
        ("count", "OPEN", str(len(lesions))),
        ("modality", "OPEN", modality_name),
        ("modality", "CLOSED", "yes" if phantom.modality == "CT" else "no"),
    ]
    if largest := phantom.largest_lesion:
        qa += [("size", "OPEN", largest.size_class), ("organ", "OPEN", largest.organ)]
    if len(lesions) == 1:
        side = lesions[0].side
        qa += [("side", "OPEN", side), ("side", "CLOSED", "yes" if side == "left" else "no")]
    return [{"kind": k, "answer_type": t, "wordings": WORDINGS[k, t], "answer": a} for k, t, a in qa]


def conversation_order(qa: list[dict], rng: random.Random) -> list[dict]:
    """The order a conversation asks a slice's questions in, such that no question gives away an answer
    the model should read from the image.

    Size, organ and side are asked only of slices with a lesion (side only with one). So they come after
    presence and count, or, in a third of the conversations, presence and count are not asked at all and a
    lesion question may open (a lesion-free slice then gets only the modality questions). That third is
    drawn alike for every slice, so whether presence or count opens a conversation says nothing about the
    slice, and every kind of question is sometimes asked first, as an evaluation asks it.
    """
    if rng.random() < 1 / 3:
        kept = [item for item in qa if item["kind"] not in ("presence", "count")]
        return rng.sample(kept, len(kept))
    opening = [item for item in qa if item["kind"] in ("presence", "count", "modality")]
    about_a_lesion = [item for item in qa if item not in opening]
    ordered = rng.sample(opening, len(opening))
    answered = 1 + max(i for i, item in enumerate(ordered) if item["kind"] in ("presence", "count"))
    for item in about_a_lesion:
        ordered.insert(rng.randint(answered, len(ordered)), item)
    return ordered


def write_phantom_set(out: str | Path, n: int, seed: int, size: int = 1152, image_format: str = "dcm") -> dict:
    """Generate `n` phantoms into `out`: `images/`, `captions.json` (pretrain; its lesion boxes are the
    tower stage's finding maps), `conversations.json` (finetune), `test.json` (LLaVA-Med evaluation
    format) and `phantoms.jsonl` (ground truth)."""
    if image_format not in PHANTOM_FORMATS:
        raise ValueError(f"image_format must be one of {', '.join(PHANTOM_FORMATS)}, got {image_format!r}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    captions, conversations, tests, truth = [], [], [], []
    for index in range(n):
        phantom = make_phantom(seed, index, size)
        image = f"{phantom.id}.{image_format}"
        if image_format == "dcm":
            save_phantom_dicom(phantom, out / "images" / image)
        elif image_format == "nii.gz":
            save_phantom_nifti(phantom, out / "images" / image)
        else:
            Image.fromarray(phantom_uint8(phantom)).save(out / "images" / image)
        description = [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{DESCRIBE}"},
            {"from": "gpt", "value": describe(phantom)},
        ]
        boxes = [lesion.box for lesion in phantom.lesions]
        captions.append({"id": phantom.id, "image": image, "conversations": description, "finding_boxes": boxes})
        qa = questions(phantom)
        turns = []
        rng = random.Random(f"{seed}-{index}")
        for i, item in enumerate(conversation_order(qa, rng)):
            prefix = f"{IMAGE_PLACEHOLDER}\n" if i == 0 else ""
            question = prefix + rng.choice(item["wordings"])
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": item["answer"]}]
        conversations.append({"id": phantom.id, "image": image, "conversations": turns})
        if rng.random() < DESCRIBED_FRACTION:  # the caption again, so instruction tuning keeps describing
            conversations.append({"id": f"{phantom.id}-description", "image": image, "conversations": description})
        size_class = phantom.largest_lesion.size_class if phantom.lesions else "none"
        for i, item in enumerate(qa):
            tests.append(
                {
                    "id": f"{phantom.id}-q{i}",
                    "image": image,
                    "conversations": [
                        {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{item['wordings'][0]}"},
                        {"from": "gpt", "value": item["answer"]},
                    ],
                    "answer_type": item["answer_type"],
                    "question_type": item["kind"],
                    "lesion_size": size_class,
                }
            )
        lesions = [asdict(lesion) | {"side": lesion.side} for lesion in phantom.lesions]
        truth.append({"id": phantom.id, "image": image, "modality": phantom.modality, "lesions": lesions})
    for name, records in (("captions", captions), ("conversations", conversations), ("test", tests)):
        (out / f"{name}.json").write_text(json.dumps(records, indent=1))
    (out / "phantoms.jsonl").write_text("".join(json.dumps(t) + "\n" for t in truth))
    return {"images": n, "captions": len(captions), "conversations": len(conversations), "questions": len(tests)}
