"""`check`: what a data set holds, and what would make training fail or learn wrong labels.

    report = check("voc2012")              # a prepared, registered data set (segjax data prepare first)
    report = check("/data/mine", num_classes=5)   # a folder: its manifest.json, or the common layout
    print(report.table); report.problems; report.ok

A folder is read through the same rules as `segjax data prepare folder` (segjax.data.folder and
segjax.data.validate): the same manifest or layout, value map, ROI, decoding and mask checks. Every
file that breaks a rule becomes one line of `problems`, naming it, instead of stopping at the first.
"""
from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np
from PIL import Image

from segjax.data import folder, registry, validate
from segjax.data.prepare import _builder_dir, class_names, open_source
from segjax.errors import SegjaxError

VOID = validate.VOID
NAN_IOU = ("segjax.metrics.scores: NaN IoU there unless predicted; mIoU skips NaN (nanmean)",
           "predicted there (a false positive), the class scores IoU 0 and lowers mIoU")


@dataclasses.dataclass
class CheckReport:
    table: str                        # one printable table
    problems: list[str]               # one line per offending file, naming it
    num_classes: int = 0
    class_weights: tuple[float, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


class _Split:
    def __init__(self):
        self.images = self.masks = 0
        self.hw: list[tuple[int, int]] = []
        self.pixels = np.zeros(256, np.int64)          # pixels per label value
        self.masks_with = np.zeros(256, np.int64)      # masks holding each value
        self.image_pixels_with = np.zeros(256, np.int64)  # labelled pixels of the masks holding each value

    def add(self, mask: np.ndarray) -> None:
        counts = np.bincount(mask.reshape(-1), minlength=256)[:256]
        self.pixels += counts
        present = counts > 0
        self.masks_with += present
        self.image_pixels_with[present] += counts[:VOID].sum() + counts[VOID + 1:].sum()


class _Reader:
    def __init__(self):
        self.splits: dict[str, _Split] = {}
        self.problems: list[str] = []
        self.kinds = collections.Counter()   # validate.InvalidData kinds, plus "binary_0_255_seen"
        self.modes = collections.Counter()   # PIL modes of the mask files (folders only)

    def split(self, name: str) -> _Split:
        return self.splits.setdefault(name, _Split())

    def problem(self, e: Exception, kind: str | None = None) -> None:
        self.problems.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
        self.kinds[getattr(e, "kind", None) or kind or "unreadable"] += 1


def check(name_or_dir: str, data_dir: str | None = None, num_classes: int | None = None,
          in_channels: int | None = None) -> CheckReport:
    """Reads every image and mask of a registered, prepared data set (`voc2012`, `folder:<name>`, ...)
    or of a folder, and reports counts, sizes, labels, class frequencies and problems.

    num_classes: what the model will predict; default the data set's own classes (a folder without
    classes: the largest label found + 1). Raises SegjaxError (one line) for an unprepared data set,
    a missing or empty folder, or a folder in no known layout.
    in_channels: a folder's image band count (default its manifest's, else 3, RGB): every image is
    read as training reads it, so one with another band count is a problem.
    """
    if os.sep in name_or_dir or not registry.is_registered(name_or_dir):
        return _check_dir(name_or_dir, num_classes, in_channels)
    return _check_prepared(name_or_dir, data_dir, num_classes)


# ------------------------------------------------------------------------------------------ readers

def _check_prepared(name: str, data_dir: str | None, num_classes: int | None) -> CheckReport:
    import tensorflow_datasets as tfds

    builder_dir = _builder_dir(name, data_dir)  # raises: run `segjax data prepare NAME`
    names = class_names(name, data_dir)
    classes = num_classes or len(names)
    reader = _Reader()
    for split in tfds.builder_from_directory(builder_dir).info.splits:
        source = open_source(name, split, data_dir)
        s = reader.split(split)
        for i in range(len(source)):
            where = f"{name} {split}[{i}]"
            try:
                ex = source[i]
            except Exception as e:  # a damaged array_record file: name the record, go on
                reader.problem(SegjaxError(f"{where}: unreadable record ({type(e).__name__}: {e}); "
                                           f"prepare it again"), "unreadable")
                continue
            image, mask = np.asarray(ex["image"]), np.asarray(ex["segmentation_mask"])
            where = f"{name} {split} {ex['file_name']}"
            s.images += 1
            s.masks += 1
            s.hw.append(image.shape[:2])
            s.add(mask)
            try:
                validate.check_mask(mask, image_hw=image.shape[:2], num_classes=classes, where=where,
                                    image_where=where, remapped=True)
            except validate.InvalidData as e:
                reader.problem(e)
    entry, _ = registry.lookup(name)
    eval_split = entry.eval_split if entry.eval_split in reader.splits else None
    return _report(reader, f"{name} (prepared, {builder_dir})", names, classes,
                   "given" if num_classes else "the data set's", eval_split)


def _check_dir(root: str, num_classes: int | None, in_channels: int | None = None) -> CheckReport:
    root = os.path.abspath(root)
    manifest, source = _folder_manifest(root, in_channels)
    names = manifest["class_names"]
    classes = num_classes or (len(names) if names else None)
    reader = _Reader()
    binary = []  # pairs whose mask holds only 0 and 255, checked again once num_classes is inferred
    for split, spec in manifest["splits"].items():
        try:
            pairs = folder.match_pairs(root, spec, split, missing=lambda m: reader.problem(SegjaxError(m), "missing"))
        except folder.EmptySplit as e:
            reader.problem(e, "empty")
            continue
        s = reader.split(split)
        for pair in pairs:
            binary += _check_pair(reader, s, pair, manifest, classes)
    if not any(s.images for s in reader.splits.values()):
        raise SegjaxError(f"{root}: no images found in any split ({', '.join(manifest['splits'])}); "
                          "check the folder or its manifest")
    how = "given" if num_classes else f"from {folder.MANIFEST_FILE}" if names and not _layout(root) else \
        f"from {folder.CLASSES_FILE}" if names else None
    if classes is None:  # the layout without classes.txt: as `segjax data prepare folder` infers them
        labels = np.flatnonzero(sum(s.pixels for s in reader.splits.values())[:VOID])
        classes = max(int(labels.max()) + 1 if len(labels) else 1, 2)
        how = "inferred: the largest label found + 1; pass num_classes or write classes.txt"
        if classes == 2:
            for pair in binary:  # check_pair was run with no class limit: the 0/255 rule needs it
                try:
                    folder.check_pair(pair, manifest, folder.image_hw(pair[1], manifest),
                                      folder.load_mask(pair, manifest), classes)
                except validate.InvalidData as e:
                    reader.problem(e)
    names = list(names or folder.layout_class_names(classes))
    eval_split = next((s for s in ("val", "validation", "test") if s in reader.splits), None)
    return _report(reader, source, names, classes, how, eval_split)


def _folder_manifest(root: str, in_channels: int | None) -> tuple[dict, str]:
    """(the folder's manifest, as training reads it; how it was found) or a one-line error."""
    if not os.path.isdir(root):
        raise SegjaxError(f"{root}: no such folder and no registered data set of that name; give a folder or one of "
                          f"{', '.join(registry.names())}")
    if not any(files for _, _, files in os.walk(root)):
        raise SegjaxError(f"{root}: empty folder; put images in {{train,val}}/images/ and masks in "
                          "{train,val}/masks/<stem>.png, or add a manifest.json (see segjax/data/folder.py)")
    manifest = folder.with_channels(folder.resolve_manifest(root, infer_classes=False), in_channels)
    if _layout(root):
        return manifest, f"{root} (layout {{split}}/images/*, {{split}}/masks/<stem>.png)"
    return manifest, f"{root} ({folder.MANIFEST_FILE})"


def _check_pair(reader: "_Reader", s, pair, manifest: dict, classes: int | None) -> list:
    """Reads one image/mask pair as training does, counting it into split `s` and reporting its problems
    to `reader`; returns [pair] when its mask holds only 0 and 255 (checked again once the number of
    classes is inferred), else []."""
    s.images += 1
    try:
        hw = folder.image_hw(pair[1], manifest)
        s.hw.append(hw)
    except (validate.InvalidData, OSError) as e:
        reader.problem(e, "unreadable")
        hw = None
    try:
        with Image.open(pair[2]) as img:
            reader.modes[img.mode] += 1
    except (OSError, SyntaxError, ValueError):
        pass
    try:
        mask = folder.load_mask(pair, manifest)
    except (validate.InvalidData, OSError) as e:
        reader.problem(e, "unreadable")
        return []
    s.masks += 1
    s.add(mask)
    remapped = bool(manifest.get("value_map")) or manifest.get("threshold") is not None
    binary = set(np.unique(mask).tolist()) == {0, VOID} and not remapped
    if binary:
        reader.kinds["binary_0_255_seen"] += 1
    if hw is not None:
        try:
            folder.check_pair(pair, manifest, hw, mask, classes or VOID + 1)
        except validate.InvalidData as e:
            reader.problem(e)
    return [pair] if binary else []


def _layout(root: str) -> bool:
    return not os.path.isfile(os.path.join(root, folder.MANIFEST_FILE))


# ------------------------------------------------------------------------------------------ the table

def median_frequency_weights(split: _Split, num_classes: int) -> tuple[float, ...]:
    """Median-frequency balancing (Eigen & Fergus): freq(c) = pixels of c / labelled pixels of the
    masks where c occurs; weight(c) = median(freq) / freq(c). A class absent from the split gets 1.0
    (it never appears as a label, so its weight does nothing)."""
    pixels = split.pixels[:num_classes].astype(np.float64)
    totals = split.image_pixels_with[:num_classes].astype(np.float64)
    present = pixels > 0
    if not present.any():
        return tuple(1.0 for _ in range(num_classes))
    freq = np.where(present, pixels / np.maximum(totals, 1), 0.0)
    median = float(np.median(freq[present]))
    return tuple(float(f"{median / f:.4g}") if p else 1.0 for f, p in zip(freq, present))


def _stats(values: list[int]) -> str:
    return f"{min(values)}/{int(np.median(values))}/{max(values)}" if values else "-"


def _labels(values) -> str:
    values = [int(v) for v in values]
    if not values:
        return "none"
    runs, start = [], values[0]
    for a, b in zip(values, values[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(runs)


def _report(reader: _Reader, source: str, names, classes: int, how: str | None, eval_split) -> CheckReport:
    rows: list[tuple[str, str] | None] = []  # None: a rule
    rows.append(("data set", source))
    rows.append(("classes", f"{classes} ({how})" if how else str(classes)))
    rows.append(None)
    split_names = list(reader.splits)
    width = max([5] + [len(n) for n in split_names])
    rows.append(("split", f"{'':{width}}  images   masks   H min/median/max   W min/median/max"))
    for name, s in reader.splits.items():
        rows.append(("", f"{name:{width}}  {s.images:6d}  {s.masks:6d}   {_stats([h for h, _ in s.hw]):16}   "
                         f"{_stats([w for _, w in s.hw])}"))
    rows.append(None)
    total = sum((s.pixels for s in reader.splits.values()), np.zeros(256, np.int64))
    found = np.flatnonzero(total)
    inside = [v for v in found if v < classes]
    outside = [v for v in found if classes <= v != VOID]
    void = total[VOID] / max(total.sum(), 1)
    text = _labels(inside) + (f"; void 255: {100 * void:.2f}% of pixels" if total[VOID] else "; no void (255)")
    rows.append(("labels found", f"in [0, {classes}): {text}"))
    if outside:
        rows.append(("", f"outside [0, {classes}) and not 255: {_labels(outside)} "
                         f"(in {reader.kinds['labels']} mask(s)): see the problems"))
    kinds = reader.kinds
    modes = ", ".join(f"{m} {n}" for m, n in sorted(reader.modes.items())) or "stored as single-channel PNG"
    rows.append(("mask files", f"modes: {modes}"))
    rows.append(("", f"RGB colour masks {kinds['rgb']}, more channels than one {kinds['channels']}, "
                     f"0/255 binary masks {kinds['binary_0_255_seen']}"
                     + (" (255 is void: their foreground is ignored)" if kinds["binary_0_255_seen"] else "")))
    rows.append(("", f"size mismatches {kinds['size']}, unreadable {kinds['corrupt'] + kinds['unreadable']}, "
                     f"images without mask {kinds['missing']}"))
    rows.append(None)
    if eval_split is None:
        rows.append(("absent from val", "no val split: nothing to evaluate on"))
    else:
        absent = [c for c in range(classes) if reader.splits[eval_split].pixels[c] == 0]
        rows.append((f"absent from {eval_split}", ", ".join(f"{c} {names[c]}" for c in absent) or "none"))
        if absent:
            rows.extend(("", line) for line in NAN_IOU)
    train_name = "train" if "train" in reader.splits else split_names[0]
    train = reader.splits[train_name]
    weights = median_frequency_weights(train, classes)
    rows.append(None)
    cols = [n for n in split_names]
    name_width = max([5] + [len(str(n)) for n in names[:classes]])
    header = f"{'':4}{'name':{name_width}}  " + "  ".join(f"{c + ' px %':>12}" for c in cols) + f"  {'weight':>8}"
    rows.append(("pixel frequency", header))
    for c in range(classes):
        shares = []
        for n in cols:
            s = reader.splits[n]
            labelled = s.pixels[:classes].sum()
            shares.append(f"{100 * s.pixels[c] / labelled:12.2f}" if labelled else f"{'-':>12}")
        rows.append(("", f"{c:<4}{str(names[c]) if c < len(names) else '':{name_width}}  " + "  ".join(shares)
                         + f"  {weights[c]:8.4g}"))
    rows.append(("class weights", f"median-frequency balancing on {train_name}:"))
    rows.append(("", "'--config.class_weights=(" + ", ".join(f"{w:.4g}" for w in weights) + ")'"))
    rows.append(None)
    rows.append(("problems", f"{len(reader.problems)}: see the list" if reader.problems else "none"))
    return CheckReport(_render(rows), list(reader.problems), classes, weights)


def _render(rows) -> str:
    key_width = max(len(r[0]) for r in rows if r)
    value_width = max(len(r[1]) for r in rows if r)
    rule = f"+-{'-' * key_width}-+-{'-' * value_width}-+"
    lines = [rule]
    for r in rows:
        lines.append(rule if r is None else f"| {r[0]:{key_width}} | {r[1]:{value_width}} |")
    lines.append(rule)
    return "\n".join(lines)
