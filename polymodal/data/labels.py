"""Label hierarchies for multi-label scene recognition: names (English and Chinese), parents, groups.

Two file formats load into one `LabelHierarchy`:

* a classes file as MovingShapes writes it (``classes.json``): ``classes`` (English names, the index
  order of record ``labels``), optional ``classes_zh`` (same order), ``parents`` ({child: parent}),
  and optional name lists that form label groups (``temporal``, ``frame_level``, ...);
* a JSON tree: ``{"labels": [{"name": "motion", "name_zh": "运动", "children": [...]}, ...]}`` (or the
  bare list). Indices follow a depth-first walk, parents before their children. A node may carry
  ``"groups": ["temporal"]``; children do not inherit groups.

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
        out.update({k: list(v) for k, v in self.groups.items()})
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


__all__ = ["LabelHierarchy", "hierarchy_from_classes", "hierarchy_from_tree", "load_hierarchy", "GROUP_KEYS"]
