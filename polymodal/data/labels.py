"""Class lists and label hierarchies: names (English and Chinese), parents, groups; record labels by name.

Two file formats load into one `LabelHierarchy`:

* a classes file as MovingShapes writes it (``classes.json``): ``classes`` (English names, the index
  order of record ``labels``), optional ``classes_zh`` (same order), ``parents`` ({child: parent}),
  and optional name lists that form label groups (``temporal``, ``frame_level``, ...);
* a JSON tree: ``{"labels": [{"name": "motion", "name_zh": "运动", "children": [...]}, ...]}`` (or the
  bare list). Indices follow a depth-first walk, parents before their children. A node may carry
  ``"groups": ["temporal"]``; children do not inherit groups.

Class lists come from a classes file, a label tree, or inline (`parse_class_list`: ``cat,dog,"red car"``);
`resolve_label` / `label_indices` turn record labels given by name into indices, with errors that name
the manifest line, the label and the classes' source.

Parents always come before their children in `order()`, so a single pass over `order()` can
propagate scores or truths from the roots down (see `polymodal.models.scene.refine_with_parents`).
A hierarchy is checked when it is built: unknown parents, cycles, duplicate names and Chinese name
lists of the wrong length are errors naming the file and the label.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..config import ConfigError

# keys of a MovingShapes classes.json that hold label groups (lists of class names)
GROUP_KEYS = ("temporal", "frame_level", "parent_classes", "action_classes")


@dataclass
class LabelHierarchy:
    """Labels with names, an optional parent each, and named groups of labels.

    Args:
        names: the C English names; record labels index this list.
        parents: {child name: parent name}; labels absent from it are roots.
        names_zh: the C Chinese names (same order), or None.
        groups: {group name: [label names]}, e.g. ``temporal`` (labels that need frame order).
        where: the file the hierarchy came from (for error messages).
    """
    names: list
    parents: dict = field(default_factory=dict)
    names_zh: list | None = None
    groups: dict = field(default_factory=dict)
    where: str = "label hierarchy"

    def __post_init__(self):
        self.names = [str(n) for n in self.names]
        if not self.names:
            raise ConfigError(f"{self.where}: no labels")
        seen = set()
        for n in self.names:
            if n in seen:
                raise ConfigError(f"{self.where}: label {n!r} appears twice; label names must be unique")
            seen.add(n)
        self.index = {n: i for i, n in enumerate(self.names)}
        if self.names_zh is not None and len(self.names_zh) != len(self.names):
            raise ConfigError(f"{self.where}: {len(self.names_zh)} Chinese names for {len(self.names)} labels; "
                              f"give one per label, in the same order")
        for child, parent in self.parents.items():
            for role, name in (("label", child), ("parent", parent)):
                if name not in self.index:
                    raise ConfigError(f"{self.where}: {role} {name!r} in parents ({child!r} -> {parent!r}) is not "
                                      f"one of the labels; add it to the label list or fix the name")
        for group, members in self.groups.items():
            unknown = [m for m in members if m not in self.index]
            if unknown:
                raise ConfigError(f"{self.where}: group {group!r} names unknown label(s) {unknown[:5]}")
        self._order = self._topological_order()

    # ---- structure -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def _topological_order(self) -> list[int]:
        """Label indices with every parent before its children; raises on a cycle."""
        depth: dict[int, int] = {}
        for i in range(len(self.names)):
            path, node = [], i
            while node not in depth:
                if node in path:
                    cycle = " -> ".join(self.names[j] for j in path[path.index(node):] + [node])
                    raise ConfigError(f"{self.where}: the parents form a cycle ({cycle}); a label cannot be its "
                                      f"own ancestor")
                path.append(node)
                parent = self.parents.get(self.names[node])
                if parent is None:
                    depth[node] = 0
                    path.pop()
                    break
                node = self.index[parent]
            for node in reversed(path):                # depth of each label on the walked path
                parent = self.parents.get(self.names[node])
                depth[node] = 0 if parent is None else depth[self.index[parent]] + 1
        return sorted(range(len(self.names)), key=lambda i: (depth[i], i))

    def order(self) -> list[int]:
        """Label indices, parents before children (by depth, then index)."""
        return list(self._order)

    def parent_index(self) -> Tensor:
        """(C,) long: the parent's index of each label, -1 for roots."""
        return torch.tensor([self.index[self.parents[n]] if n in self.parents else -1 for n in self.names],
                            dtype=torch.long)

    def ancestors(self, name: str) -> list[str]:
        """The label's ancestors, nearest first."""
        out, node = [], name
        while node in self.parents:
            node = self.parents[node]
            out.append(node)
        return out

    def children(self, name: str) -> list[str]:
        """The label's direct children, in index order."""
        return [n for n in self.names if self.parents.get(n) == name]

    def depth(self, name: str) -> int:
        """0 for a root, 1 for its children, ..."""
        return len(self.ancestors(name))

    def display_names(self, lang: str = "en") -> list[str]:
        """The names in `lang` ("en" or "zh"), e.g. for label-name embeddings."""
        if lang == "en":
            return list(self.names)
        if lang == "zh":
            if self.names_zh is None:
                raise ConfigError(f"{self.where}: no Chinese names (classes_zh / name_zh); use lang=en")
            return list(self.names_zh)
        raise ConfigError(f"{self.where}: label language {lang!r} is not one of en, zh")

    def group_mask(self, group: str) -> Tensor:
        """(C,) bool: the labels of `group`."""
        if group not in self.groups:
            raise KeyError(f"{self.where}: no label group {group!r}; groups: {', '.join(self.groups) or 'none'}")
        mask = torch.zeros(len(self.names), dtype=torch.bool)
        mask[[self.index[n] for n in self.groups[group]]] = True
        return mask

    # ---- targets and predictions ---------------------------------------------------------------------
    def targets(self, records_labels: Sequence[Sequence], close: bool = False, where: str = "manifest") -> Tensor:
        """(N, C) 0/1 targets from each record's labels (names or integer indices).

        Args:
            records_labels: one label list per record.
            close: also mark every ancestor of a present label (for data that lists only leaves).
            where: the manifest, for error messages.
        Raises:
            ValueError: an unknown name or an index outside [0, C), naming the record.
        """
        out = torch.zeros(len(records_labels), len(self.names))
        for i, labels in enumerate(records_labels):
            for lab in labels:
                if isinstance(lab, int) and not isinstance(lab, bool):
                    if not 0 <= lab < len(self.names):
                        raise ValueError(f"{where}: record {i + 1}: label index {lab} is outside [0, {len(self.names)})")
                    out[i, lab] = 1.0
                elif lab in self.index:
                    out[i, self.index[lab]] = 1.0
                else:
                    raise ValueError(f"{where}: record {i + 1}: label {lab!r} is not in {self.where}")
        return self.close_upwards(out) if close else out

    def close_upwards(self, targets: Tensor) -> Tensor:
        """(N, C) 0/1 -> the same with every ancestor of a 1 set to 1."""
        out = targets.clone()
        parent = self.parent_index()
        for c in reversed(self._order):               # children before parents: chains close in one pass
            p = int(parent[c])
            if p >= 0:
                out[:, p] = torch.maximum(out[:, p], out[:, c])
        return out

    def consistency(self, predicted: Tensor) -> float:
        """Share (percent) of predicted labels that have a parent whose parent is also predicted.

        Args:
            predicted: (N, C) 0/1 (or bool) predictions.
        Returns:
            100 * #(predicted child with predicted parent) / #(predicted child); NaN when no label with a
            parent is predicted.
        """
        pred = torch.as_tensor(predicted).bool()
        parent = self.parent_index()
        has = parent >= 0
        if not has.any():
            return float("nan")
        child_pred = pred[:, has]                                        # (N, C')
        parent_pred = pred[:, parent[has]]                               # (N, C')
        n = int(child_pred.sum())
        return float("nan") if n == 0 else 100.0 * int((child_pred & parent_pred).sum()) / n

    def to_dict(self) -> dict:
        """The JSON-ready classes-file form (``classes``, ``classes_zh``, ``parents`` and the groups)."""
        out = {"classes": list(self.names), "parents": dict(self.parents)}
        if self.names_zh is not None:
            out["classes_zh"] = list(self.names_zh)
        # The standard group keys stand at the top, as in a classes file; any other group under "groups", where
        # `hierarchy_from_classes` reads it back (a group written at the top under another name would be lost).
        out.update({k: list(v) for k, v in self.groups.items() if k in GROUP_KEYS})
        other = {k: list(v) for k, v in self.groups.items() if k not in GROUP_KEYS}
        if other:
            out["groups"] = other
        return out


# ---- loading -------------------------------------------------------------------------------------------
def hierarchy_from_classes(data: dict, where: str = "classes.json") -> LabelHierarchy:
    """A hierarchy from a classes-file dict (``classes``, ``classes_zh``, ``parents``, group lists)."""
    if "classes" not in data or not isinstance(data["classes"], list):
        raise ConfigError(f"{where}: expected a 'classes' list of label names")
    groups = {k: list(data[k]) for k in GROUP_KEYS if isinstance(data.get(k), list)}
    groups.update({k: list(v) for k, v in (data.get("groups") or {}).items()})
    return LabelHierarchy(list(data["classes"]), dict(data.get("parents") or {}), data.get("classes_zh"), groups,
                          where)


def hierarchy_from_tree(nodes: list, where: str = "label tree") -> LabelHierarchy:
    """A hierarchy from a JSON tree: nodes ``{"name", "name_zh"?, "groups"?, "children"?: [nodes]}``.

    Indices follow a depth-first walk (a parent before its children). Chinese names are kept only when
    every node has one.
    """
    names, zh, parents, groups = [], [], {}, {}

    def walk(node, parent, path):
        if not isinstance(node, dict) or not isinstance(node.get("name"), str):
            raise ConfigError(f"{where}: {path}: each node needs a 'name' string, got {node!r}")
        name = node["name"]
        names.append(name)
        zh.append(node.get("name_zh"))
        if parent is not None:
            parents[name] = parent
        for g in node.get("groups", []):
            groups.setdefault(g, []).append(name)
        for k, child in enumerate(node.get("children", [])):
            walk(child, name, f"{path}.children[{k}]")

    if not isinstance(nodes, list):
        raise ConfigError(f"{where}: expected a list of label nodes")
    for k, node in enumerate(nodes):
        walk(node, None, f"labels[{k}]")
    names_zh = zh if all(isinstance(z, str) for z in zh) else None
    return LabelHierarchy(names, parents, names_zh, groups, where)


def load_hierarchy(path) -> LabelHierarchy:
    """A label hierarchy from a JSON file: a classes file (``classes`` key) or a tree (``labels`` list of nodes,
    or a bare list).

    Raises:
        FileNotFoundError: no such file. ConfigError: a malformed file (naming it and the label).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label hierarchy {path} does not exist; give a classes.json or a label tree file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if isinstance(data, dict) and "classes" in data:
        return hierarchy_from_classes(data, str(path))
    if isinstance(data, dict) and isinstance(data.get("labels"), list):
        return hierarchy_from_tree(data["labels"], str(path))
    if isinstance(data, list):
        return hierarchy_from_tree(data, str(path))
    raise ConfigError(f"{path}: expected a 'classes' list (classes file) or a 'labels' list of nodes (label tree)")



# ---- class lists: files, inline lists, record labels ---------------------------------------------------
class LabelError(ValueError):
    """A record's label is not one of the classes (the message names the label and the classes' source)."""


def parse_class_list(text: str) -> list[str]:
    """Class names written inline, comma-separated, with CSV quoting: ``cat,dog,"red car"``.

    Args:
        text: the list; a name holding a comma goes in double quotes (``"big, red car"``), spaces around
            names are dropped.
    Returns:
        The names, in order.
    Raises:
        ConfigError: an empty name, a repeated name, or fewer than two names.
    """
    import csv
    rows = list(csv.reader([text], skipinitialspace=True))
    names = [n.strip() for n in (rows[0] if rows else [])]
    where = f"--classes {text!r}"
    if any(not n for n in names):
        raise ConfigError(f"{where}: an empty class name (two commas in a row, or a trailing comma); "
                          f"write the names as cat,dog,\"red car\"")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: class {dupes[0]!r} is listed twice; each class once")
    if len(names) < 2:
        raise ConfigError(f"{where}: needs at least two comma-separated class names (or a classes file path)")
    return names


def classes_argument(value: str):
    """What a `--classes` value means: an existing file path (returned as is) or an inline list.

    Args:
        value: the command-line value: a classes file (classes.json or one name per line) or ``cat,dog,...``.
    Returns:
        The path string when a file of that name exists, else the parsed list of names.
    Raises:
        FileNotFoundError: not a file and holds no comma (a mistyped path, most likely).
        ConfigError: an inline list `parse_class_list` refuses.
    """
    if Path(value).is_file():
        return value
    if "," not in value:
        raise FileNotFoundError(f"--classes {value}: no such classes file; give a classes.json, a text file with "
                                f"one class per line, or the names inline: --classes cat,dog,\"red car\"")
    return parse_class_list(value)


def class_names(classes, lang: str = "en") -> tuple[list[str], str]:
    """The class names a classes source holds, and a label for messages.

    Args:
        classes: a list of names; a classes file (JSON with ``classes`` and optional ``classes_<lang>``, or a
            text file with one name per line); or a JSON label tree (names in depth-first order).
        lang: "en" reads ``classes``; another language reads ``classes_<lang>`` (JSON only).
    Returns:
        (names, where): where is the file path, or "the inline class list".
    Raises:
        FileNotFoundError: no such file. ConfigError: the file holds no usable list (naming it).
    """
    if isinstance(classes, (list, tuple)):
        names = [str(n) for n in classes]
        if not names:
            raise ConfigError("the inline class list is empty")
        return names, "the inline class list"
    path = Path(classes)
    if not path.is_file():
        raise FileNotFoundError(f"classes file {path} does not exist; give a classes.json, a text file with one "
                                f"class per line, or an inline list")
    if path.suffix != ".json":
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not names:
            raise ConfigError(f"{path}: no class names (one per line)")
        return names, str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    key = "classes" if lang == "en" else f"classes_{lang}"
    if isinstance(data, dict) and isinstance(data.get(key), list):
        return [str(n) for n in data[key]], str(path)
    if lang == "en" and (isinstance(data, list) or (isinstance(data, dict) and isinstance(data.get("labels"), list))):
        tree = load_hierarchy(path)
        return list(tree.names), str(path)
    raise ConfigError(f"{path}: expected a {key!r} list of class names")


def resolve_label(value, index: dict, where: str):
    """One record label as a class index.

    Args:
        value: an int index or a class name.
        index: {class name: index} of the C classes.
        where: the classes' source, for the message.
    Returns:
        The index in [0, C).
    Raises:
        LabelError: an unknown name or an index outside [0, C).
    """
    if isinstance(value, bool):
        raise LabelError(f"label {value!r} is neither a class index nor a class name")
    if isinstance(value, int):
        if not 0 <= value < len(index):
            raise LabelError(f"label index {value} is outside [0, {len(index)}) of {where}")
        return value
    if isinstance(value, str) and value in index:
        return index[value]
    if isinstance(value, str) and value.strip().isdigit():     # "3" from JSON written by hand
        return resolve_label(int(value), index, where)
    near = [n for n in index if isinstance(value, str) and n.lower() == value.strip().lower()]
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    shown = ", ".join(list(index)[:8]) + (" ..." if len(index) > 8 else "")
    raise LabelError(f"label {value!r} is not a class of {where}{hint} (classes: {shown}); fix the label "
                     f"or add the class there")


def label_index(value, index: dict | None = None, source: str = "") -> int:
    """A record's `label` as the integer class index a training batch holds.

    Args:
        value: the record's label: an int, or a class name (also a CSV cell such as "cat" or "3.5").
        index: {class name: index} when a classes file maps names; None when the run has none.
        source: the classes' source, for messages.
    Returns:
        The index (>= 0; < len(index) when `index` is given).
    Raises:
        LabelError: a class name without a classes file, a number that is not an integer, a negative index,
            or a name that is not a class; one line saying what to write instead.
    """
    if index is not None:
        return resolve_label(value, index, source or "the classes file")
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise LabelError(f"label {value} is negative; class indices start at 0")
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, (float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None:
            raise LabelError(f"label {value!r} is not an integer class index; write 0, 1, 2, ... (or a class name "
                             f"with a classes file)")
        raise LabelError(f"label {value!r} is a class name, but no classes file maps names to indices here; write "
                         f"class indices 0, 1, 2, ... in the manifest, or give a classes file where the command "
                         f"takes one (--classes)")
    raise LabelError(f"label {value!r} is neither a class index nor a class name")


def label_indices(records, classes, key: str = "label", where: str = "manifest", source: str | None = None) -> list:
    """Map the `key` field of records (names or indices) to class indices.

    Args:
        records: manifest records (their `_line` is used in messages).
        classes: names, or a classes source for `class_names`.
        key: "label" (one per record: returns ints) or "labels" (lists: returns lists of ints).
        where: the manifest, for messages.
        source: how messages name the classes (default: the file, or "the inline class list").
    Returns:
        One index (or list of indices) per record.
    Raises:
        LabelError: a record without the field, or with a label that is not a class (naming the manifest
            line, the label and the classes' source).
    """
    names, found = class_names(classes)
    source = source or found
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, r in enumerate(records):
        line = r.get("_line", i + 1)
        if key not in r:
            raise LabelError(f"{where} line {line}: no {key!r} field; every record needs one for this task")
        try:
            value = r[key]
            out.append([resolve_label(v, index, source) for v in value] if key == "labels"
                       else resolve_label(value, index, source))
        except LabelError as err:
            raise LabelError(f"{where} line {line}: {err}") from None
    return out

__all__ = ["LabelHierarchy", "hierarchy_from_classes", "hierarchy_from_tree", "load_hierarchy", "GROUP_KEYS",
           "LabelError", "parse_class_list", "classes_argument", "class_names", "resolve_label", "label_index",
           "label_indices"]
