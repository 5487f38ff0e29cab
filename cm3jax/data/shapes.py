"""Shapes: a seeded, procedurally rendered mixed-modal benchmark with an exact oracle.

Each scene holds one to `max_objects` (default three) objects. An object is a shape (`SHAPES`), a colour
(`COLORS`, ten palette colours on a black `BACKGROUND`), a size (`SIZES`) and one cell of
the 3x3 grid (`POSITIONS`, row-major); no two objects share a cell. `render` draws each
object centred in its cell in exact palette colours (no anti-aliasing), at least one
pixel inside the cell on every side, so objects in neighbouring cells never touch.
Resolutions from `MIN_RESOLUTION` (27) up are supported; sizes scale with the cell
(at 32x32: small = 5 px, large = 7 px across).

Caption grammar (`caption` writes it, `parse_caption` reads it back exactly):

    caption := phrase | phrase (", " phrase)* " and " phrase
    phrase  := "a " SIZE " " COLOUR " " SHAPE " " PLACE
    PLACE   := "at the top left" | "at the top" | "at the top right" | "on the left"
             | "in the centre" | "on the right" | "at the bottom left" | "at the bottom"
             | "at the bottom right"

Objects appear in grid order, e.g. 'a small red circle at the top left and a large blue
square in the centre'. The empty scene is `EMPTY_CAPTION`.

The oracle (`oracle`) needs no network: every pixel goes to the nearest colour among
background + palette; foreground pixels form 8-connected components (specks smaller
than a third of the smallest object are dropped); components are grouped by the grid
cell of their centroid, which gives the position; the colour is the majority palette
colour of the group; shape and size come from the best intersection-over-union against
the renderer's own masks, aligned by centroid and tried at +-1 px shifts. On a
ground-truth render the true mask matches with IoU 1 and every other mask is different
(even up to translation), so the oracle is exact; noise, JPEG and blur only move the IoU
(tests: exact under Gaussian noise sigma 8 and JPEG q90 4:4:4 at 32x32). An object cut
in two by a cell border, or two touching objects, cannot be read back faithfully.

`HELD_OUT` (colour, shape) pairs never occur in 'train'; every 'validation' scene has at
least one, so validation measures zero-shot composition. SFT variants: `vqa_examples`,
`edit_example`, `grounded_layout` / `boxes`, `layout_map`, `long_description`. `ShapesSource` is a Grain random-access
source whose record i is a pure function of (seed, split, i).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import re
from typing import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "plus")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "orange": (255, 128, 0), "yellow": (255, 255, 0), "green": (0, 255, 0),
    "cyan": (0, 255, 255), "blue": (0, 0, 255), "purple": (128, 0, 255), "magenta": (255, 0, 255),
    "white": (255, 255, 255), "grey": (128, 128, 128),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right",
             "bottom left", "bottom", "bottom right")
BACKGROUND = (0, 0, 0)
MIN_RESOLUTION = 27  # smallest grid cell of 9 px: small (5 px) and large (7 px) stay distinct
SPLITS = ("train", "validation")
HELD_OUT = frozenset({("blue", "circle"), ("green", "triangle"), ("red", "square"),
                      ("yellow", "diamond")})
EMPTY_CAPTION = "an empty picture"
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLACES = {p: f"{'in' if p == 'centre' else 'on' if p in ('left', 'right') else 'at'} the {p}"
          for p in POSITIONS}
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
_ALL_COMBOS = [(c, s) for c in COLORS for s in SHAPES]
_COMBOS = {"train": [cs for cs in _ALL_COMBOS if cs not in HELD_OUT], "validation": _ALL_COMBOS}


@dataclasses.dataclass(frozen=True, order=True)
class ShapeObject:
    """One object of a scene; field values are names from SHAPES/COLORS/SIZES/POSITIONS."""

    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self):
        for value, allowed in ((self.shape, SHAPES), (self.color, COLORS), (self.size, SIZES),
                               (self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"unknown value {value!r}; expected one of {list(allowed)}")

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShapeObject":
        return cls(d["shape"], d["color"], d["size"], d["position"])


def canonical(objects: Sequence[ShapeObject]) -> list[ShapeObject]:
    """Objects sorted by grid position (row-major), the order captions and records use."""
    return sorted(objects, key=lambda o: (POSITIONS.index(o.position), o))


def decode_objects(text: str) -> list[ShapeObject]:
    """The `objects` field of a ShapesSource record -> ShapeObjects."""
    return [ShapeObject.from_dict(d) for d in json.loads(text)]


# ----------------------------------------------------------------------------- scenes


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def sample_scene(rng: np.random.Generator, split: str, max_objects: int = 3) -> list[ShapeObject]:
    """1..max_objects random objects in distinct cells, canonically sorted.

    'train' never contains a HELD_OUT (colour, shape) pair; in 'validation' one object
    (chosen at random) always has a HELD_OUT pair and the others are unconstrained.
    """
    if split not in SPLITS or not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(f"need split in {SPLITS} and 1 <= max_objects <= 9, "
                         f"got {split!r}, {max_objects}")
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(len(POSITIONS), size=n, replace=False)
    forced = int(rng.integers(n)) if split == "validation" else -1
    objects = []
    for k, cell in enumerate(cells):
        color, shape = _pick(rng, sorted(HELD_OUT)) if k == forced else _pick(rng, _COMBOS[split])
        objects.append(ShapeObject(shape, color, _pick(rng, SIZES), POSITIONS[int(cell)]))
    return canonical(objects)


# ----------------------------------------------------------------------------- geometry


# Each shape is {(u, v) in [-1, 1]^2 : f(u, v) <= 1}, sampled at pixel centres.
_SHAPE_FNS = {
    "circle": lambda u, v: u * u + v * v,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)),
    "triangle": lambda u, v: 2 * np.abs(u) - v,
    "diamond": lambda u, v: np.abs(u) + np.abs(v),
    "plus": lambda u, v: 3 * np.minimum(np.abs(u), np.abs(v)),
}


def _unit_mask(shape: str, s: int) -> np.ndarray:
    """The s x s boolean mask of `shape`."""
    c = (np.arange(s) + 0.5) / s * 2 - 1
    v, u = np.meshgrid(c, c, indexing="ij")
    return _SHAPE_FNS[shape](u, v) <= 1 + 1e-9


@dataclasses.dataclass(frozen=True)
class _Geometry:
    edges: tuple[int, int, int, int]  # cell boundaries along each axis
    side: dict[str, int]  # size name -> drawing box side in pixels
    masks: dict[tuple[str, str], tuple[np.ndarray, int, int]]  # -> cropped mask, dy, dx

    def placed(self, obj: ShapeObject) -> tuple[np.ndarray, int, int]:
        """The object's cropped mask and the (y, x) of its top-left pixel: the drawing box is
        centred in the cell (rounding up-left)."""
        (r, c), e, s = divmod(POSITIONS.index(obj.position), 3), self.edges, self.side[obj.size]
        mask, dy, dx = self.masks[(obj.shape, obj.size)]
        return mask, e[r] + (e[r + 1] - e[r] - s) // 2 + dy, e[c] + (e[c + 1] - e[c] - s) // 2 + dx


@functools.lru_cache(maxsize=32)
def geometry(resolution: int) -> _Geometry:
    """Grid cells, object sizes and shape masks at `resolution` (ValueError if too small)."""
    if not isinstance(resolution, (int, np.integer)) or resolution < MIN_RESOLUTION:
        raise ValueError(f"shapes resolution must be an integer >= {MIN_RESOLUTION}, "
                         f"got {resolution!r}")
    resolution = int(resolution)
    cell = resolution // 3
    odd = lambda n: n - 1 + n % 2  # noqa: E731
    large = odd(cell - 2 * max(1, cell // 10))  # >= 1 px margin on each side in the cell
    side = {"small": max(5, odd(round(0.55 * large))), "large": large}
    masks = {}
    for shape in SHAPES:
        for size in SIZES:
            m = _unit_mask(shape, side[size])
            ys, xs = np.nonzero(m)
            y0, x0 = int(ys.min()), int(xs.min())
            masks[(shape, size)] = (m[y0: ys.max() + 1, x0: xs.max() + 1], y0, x0)
    return _Geometry(tuple(k * resolution // 3 for k in range(4)), side, masks)


def _check_scene(objects: Sequence[ShapeObject]) -> None:
    positions = [o.position for o in objects]
    if len(set(positions)) != len(positions):
        raise ValueError(f"two objects share a grid cell: {positions}")


def render(objects: Sequence[ShapeObject], resolution: int = 32) -> np.ndarray:
    """Draws the scene: uint8 [R, R, 3], only BACKGROUND and palette colours, deterministic."""
    g = geometry(resolution)
    _check_scene(objects)
    image = np.empty((resolution, resolution, 3), np.uint8)
    image[:] = BACKGROUND
    for obj in objects:
        mask, y, x = g.placed(obj)
        image[y: y + mask.shape[0], x: x + mask.shape[1]][mask] = COLORS[obj.color]
    return image


def boxes(objects: Sequence[ShapeObject], resolution: int = 32) -> list[tuple[int, int, int, int]]:
    """Exact pixel boxes (x0, y0, x1, y1) of the rendered objects, half-open like slices
    (the object covers columns x0..x1-1 and rows y0..y1-1), in the order given."""
    placed = [geometry(resolution).placed(obj) for obj in objects]
    return [(x, y, x + m.shape[1], y + m.shape[0]) for m, y, x in placed]


def grounded_layout(objects: Sequence[ShapeObject], resolution: int = 32) -> str:
    """The scene as a grounded layout, canonical order, '; '-separated entries
    'SIZE COLOUR SHAPE [x0,y0,x1,y1]' with `boxes` coordinates, e.g.
    'small red circle [2,2,7,7]; large blue square [12,12,19,19]'."""
    objects = canonical(objects)
    return "; ".join(f"{o.size} {o.color} {o.shape} [{','.join(map(str, b))}]"
                     for o, b in zip(objects, boxes(objects, resolution)))


# ----------------------------------------------------------------------------- captions


def caption(objects: Sequence[ShapeObject]) -> str:
    """The canonical caption (grammar in the module docstring)."""
    phrases = [f"a {o.size} {o.color} {o.shape} {PLACES[o.position]}" for o in canonical(objects)]
    if not phrases:
        return EMPTY_CAPTION
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


_ALIASES = {"gray": "grey", "center": "centre", "middle": "centre"}
_PHRASE_RE = re.compile(
    rf"(?:a|an|one) ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) (?:at|in|on) the "
    rf"({'|'.join(sorted(POSITIONS, key=len, reverse=True))})"
)


def parse_caption(text: str) -> list[ShapeObject] | None:
    """Inverse of `caption`, canonically sorted; tolerant of case, extra whitespace,
    a trailing period, 'gray'/'center'. None if unparseable or two objects share a cell."""
    words = re.sub(r"[.!]+$", "", " ".join(str(text).lower().split())).strip()
    words = " ".join(_ALIASES.get(w, w) for w in re.sub(r"\s*,\s*", " , ", words).split())
    if words == EMPTY_CAPTION:
        return []
    objects = []
    for part in re.split(r" , and | , | and ", words):
        m = _PHRASE_RE.fullmatch(part.strip())
        if not m:
            return None
        objects.append(ShapeObject(m[3], m[2], m[1], m[4]))
    if len({o.position for o in objects}) != len(objects):
        return None
    return canonical(objects)


# ----------------------------------------------------------------------------- oracle


def _components(fg: np.ndarray) -> np.ndarray:
    """8-connected component labels of a boolean mask (0 = background), by max propagation."""
    h, w = fg.shape
    labels = np.where(fg, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        p = np.pad(labels, 1)
        nb = np.max([p[dy: dy + h, dx: dx + w] for dy in range(3) for dx in range(3)], axis=0)
        new = np.where(fg, nb, 0)
        if np.array_equal(new, labels):
            return labels
        labels = new


def _best_template(mask: np.ndarray, g: _Geometry) -> tuple[str, str]:
    """(shape, size) whose mask, centroid-aligned and shifted by up to 1 px, has the best IoU."""
    pad = 2 * g.side["large"]
    padded = np.pad(mask, pad)
    ys, xs = np.nonzero(mask)
    cy, cx, area = ys.mean(), xs.mean(), len(ys)
    best, best_iou = ("square", "small"), -1.0
    shifts = sorted(itertools.product((-1, 0, 1), repeat=2), key=lambda s: abs(s[0]) + abs(s[1]))
    for (shape, size), (tmpl, _, _) in g.masks.items():
        ty, tx = np.nonzero(tmpl)
        oy, ox = int(round(cy - ty.mean())) + pad, int(round(cx - tx.mean())) + pad
        h, w = tmpl.shape
        for dy, dx in shifts:
            inter = np.count_nonzero(padded[oy + dy: oy + dy + h, ox + dx: ox + dx + w] & tmpl)
            iou = inter / (area + len(ty) - inter)
            if iou > best_iou + 1e-12:
                best, best_iou = (shape, size), iou
    return best


def oracle(image: np.ndarray) -> list[ShapeObject]:
    """Recovers the objects of an RGB uint8 [R, R, 3] image (R >= MIN_RESOLUTION), canonically
    sorted. Exact on ground-truth renders; see the module docstring for the method."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"oracle expects a square RGB image [R, R, 3], got shape {image.shape}")
    g = geometry(image.shape[0])
    palette = np.asarray([BACKGROUND, *COLORS.values()], np.float32)
    nearest = ((image[..., None, :].astype(np.float32) - palette) ** 2).sum(-1).argmin(-1)
    labels = _components(nearest > 0)
    min_area = max(3, min(int(m.sum()) for m, _, _ in g.masks.values()) // 3)
    edges = np.asarray(g.edges)
    groups: dict[int, np.ndarray] = {}
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    for label in ids[counts >= min_area]:
        comp = labels == label
        ys, xs = np.nonzero(comp)
        r, c = (int(np.clip(np.searchsorted(edges, v.mean(), "right") - 1, 0, 2)) for v in (ys, xs))
        groups[3 * r + c] = groups.get(3 * r + c, False) | comp
    objects = []
    for cell, mask in groups.items():
        color = list(COLORS)[int(np.bincount(nearest[mask] - 1, minlength=len(COLORS)).argmax())]
        shape, size = _best_template(mask, g)
        objects.append(ShapeObject(shape, color, size, POSITIONS[cell]))
    return canonical(objects)


def scene_match(predicted: Sequence[ShapeObject], expected: Sequence[ShapeObject]) -> bool:
    """True if both are the same multiset of objects."""
    return sorted(predicted) == sorted(expected)


def attribute_accuracy(predicted: Sequence[ShapeObject],
                       expected: Sequence[ShapeObject]) -> dict[str, float]:
    """Per-attribute accuracy, pairing objects by grid cell.

    Each fraction is over max(len(predicted), len(expected)) objects, so missing and
    spurious objects both count as wrong: 'position' = objects whose cell is occupied in
    both; 'shape' / 'color' / 'size' = paired objects agreeing on that attribute. Also
    'count' (1.0 if the numbers of objects agree) and 'scene' (1.0 if `scene_match`).
    Two empty scenes score 1.0 everywhere.
    """
    by_cell = {o.position: o for o in predicted}
    n = max(len(predicted), len(expected))
    pairs = [(by_cell[e.position], e) for e in expected if e.position in by_cell]
    frac = (lambda k: k / n) if n else (lambda k: 1.0)
    out = {"position": frac(len(pairs))}
    for attr in ("shape", "color", "size"):
        out[attr] = frac(sum(getattr(p, attr) == getattr(e, attr) for p, e in pairs))
    out["count"] = float(len(predicted) == len(expected))
    out["scene"] = float(scene_match(predicted, expected))
    return out


# ----------------------------------------------------------------------------- SFT variants


def refer(obj: ShapeObject, objects: Sequence[ShapeObject], avoid: str = "") -> str | None:
    """The shortest description ('circle', 'small circle', 'red circle', 'small red circle',
    else 'circle at the top left') that picks out `obj` among `objects` without naming the
    attribute `avoid`; None if there is none."""
    for attrs in (("shape",), ("size", "shape"), ("color", "shape"), ("size", "color", "shape")):
        same = [o for o in objects if all(getattr(o, a) == getattr(obj, a) for a in attrs)]
        if avoid not in attrs and len(same) == 1:
            return " ".join(getattr(obj, a) for a in attrs)
    return None if avoid == "position" else f"{obj.shape} {PLACES[obj.position]}"


def vqa_examples(objects: Sequence[ShapeObject], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Question/answer pairs about the scene: 'how many objects are there?', 'how many
    circles are there?', 'what colour is the circle?', 'what size is the red circle?',
    'what shape is in the centre?', 'where is the circle?' (answer: a POSITIONS name;
    asked only if the object has a description without its place), and 'is there a
    square at the top left?' (true or false with probability 1/2). Other answers are
    single words: NUMBERS, COLORS, SIZES, SHAPES names, 'yes' / 'no'."""
    objects = canonical(objects)
    shape = _pick(rng, SHAPES)
    count = NUMBERS[sum(o.shape == shape for o in objects)]
    qa = [("how many objects are there?", NUMBERS[len(objects)]),
          (f"how many {PLURALS[shape]} are there?", count)]
    if objects:
        o = _pick(rng, objects)
        qa.append((f"what colour is the {refer(o, objects, 'color')}?", o.color))
        o = _pick(rng, objects)
        qa.append((f"what size is the {refer(o, objects, 'size')}?", o.size))
        o = _pick(rng, objects)
        qa.append((f"what shape is {PLACES[o.position]}?", o.shape))
        o = _pick(rng, objects)
        if (ref := refer(o, objects, "position")) is not None:
            qa.append((f"where is the {ref}?", o.position))
    if objects and rng.random() < 0.5:
        o = _pick(rng, objects)
        shape, position = o.shape, o.position
    else:
        shape, position = _pick(rng, SHAPES), _pick(rng, POSITIONS)
    present = any(o.position == position and o.shape == shape for o in objects)
    qa.append((f"is there a {shape} {PLACES[position]}?", "yes" if present else "no"))
    return qa


def edit_example(objects: Sequence[ShapeObject], rng: np.random.Generator, *,
                 exclude: frozenset = HELD_OUT) -> tuple[str, list[ShapeObject]]:
    """A random edit instruction and the edited scene (canonical, renderable, different).

    Edits: recolour ('make the circle blue'), reshape ('turn the circle into a square'),
    resize ('make the circle large'), move to a free cell ('move the square to the
    bottom right'), remove ('remove the triangle', only with 2+ objects), add ('add a
    small green plus in the centre', only with a free cell). Objects are named by
    `refer`. No edit creates a (colour, shape) pair in `exclude` (default HELD_OUT, so
    edits of train scenes stay in train; pass frozenset() for validation scenes).
    """
    objects = canonical(objects)
    _check_scene(objects)
    free = [p for p in POSITIONS if p not in {o.position for o in objects}]
    feasible = {"recolour": objects, "reshape": objects, "resize": objects,
                "move": objects and free, "remove": len(objects) > 1, "add": free}
    ops = [op for op, ok in feasible.items() if ok]
    op = _pick(rng, ops)
    if op == "add":
        color, shape = _pick(rng, [cs for cs in _ALL_COMBOS if cs not in exclude])
        new = ShapeObject(shape, color, _pick(rng, SIZES), _pick(rng, free))
        text = f"add a {new.size} {color} {shape} {PLACES[new.position]}"
        return text, canonical([*objects, new])
    o = _pick(rng, objects)
    ref, rest = refer(o, objects), [x for x in objects if x is not o]
    if op == "remove":
        return f"remove the {ref}", rest
    if op == "recolour":
        color = _pick(rng, [c for c in COLORS if c != o.color and (c, o.shape) not in exclude])
        new, text = dataclasses.replace(o, color=color), f"make the {ref} {color}"
    elif op == "reshape":
        shape = _pick(rng, [s for s in SHAPES if s != o.shape and (o.color, s) not in exclude])
        new, text = dataclasses.replace(o, shape=shape), f"turn the {ref} into a {shape}"
    elif op == "resize":
        size = _pick(rng, [s for s in SIZES if s != o.size])
        new, text = dataclasses.replace(o, size=size), f"make the {ref} {size}"
    else:
        position = _pick(rng, free)
        new, text = dataclasses.replace(o, position=position), f"move the {ref} to the {position}"
    return text, canonical([*rest, new])


SEGMENT_COLORS = {"circle": "red", "square": "green", "triangle": "blue", "diamond": "yellow",
                  "plus": "white"}  # shape class -> the colour `layout_map` paints it in


def layout_map(objects: Sequence[ShapeObject], resolution: int = 32) -> np.ndarray:
    """The scene's segmentation map, the input of layout-to-image: each object's exact mask
    painted in the colour of its shape class (`SEGMENT_COLORS`), on the background. It fixes
    every object's shape, size and place; the colour is left to the model."""
    return render([dataclasses.replace(o, color=SEGMENT_COLORS[o.shape]) for o in objects], resolution)


def long_description(objects: Sequence[ShapeObject]) -> str:
    """A longer description of the scene than `caption`: the object count, then the caption,
    e.g. 'a picture of two objects on a black background: a small red circle ... '."""
    count = f"{NUMBERS[len(objects)]} object{'' if len(objects) == 1 else 's'}"
    return f"a picture of {count} on a black background: {caption(objects)}"


# ----------------------------------------------------------------------------- Grain source


class ShapesSource:
    """Grain RandomAccessDataSource of shapes scenes; record i depends only on (seed, split, i).

    Records: {'image': uint8 [R, R, 3], 'text': caption, 'id': 'shapes-<split>-<i>',
    'objects': JSON list of ShapeObject dicts (see `decode_objects`)}.
    """

    def __init__(self, num_records: int, resolution: int = 32, split: str = "train", seed: int = 0,
                 max_objects: int = 3):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if num_records < 0 or not 1 <= max_objects <= len(POSITIONS):
            raise ValueError("need num_records >= 0 and 1 <= max_objects <= 9, "
                             f"got {num_records}, {max_objects}")
        geometry(resolution)
        self.num_records, self.resolution, self.split = int(num_records), int(resolution), split
        self.seed, self.max_objects = int(seed), int(max_objects)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} out of range [0, {self.num_records})")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        objects = sample_scene(rng, self.split, self.max_objects)
        return {"image": render(objects, self.resolution), "text": caption(objects),
                "id": f"shapes-{self.split}-{index}",
                "objects": json.dumps([o.to_dict() for o in objects])}

    def __repr__(self) -> str:
        return (f"ShapesSource(num_records={self.num_records}, resolution={self.resolution}, "
                f"split={self.split!r}, seed={self.seed}, max_objects={self.max_objects})")
