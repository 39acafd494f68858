"""The workflow drawn server-side as inline SVG: states as boxes, transitions as labelled arrows.

Pages run no script (the CSP forbids it), so the diagram cannot be left to a Mermaid renderer in the
browser; it is laid out here from states/workflow.toml. States go in columns by their distance from the
initial state; within a column they are ordered so that arrows between neighbours skip as few boxes as
possible. Every text is escaped: a state title is data from a file an admin edits.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass
from html import escape

from retracer.workflow import Spec

BOX_W, BOX_H = 200, 58
COL_GAP, ROW_GAP = 330, 150
MARGIN = 80
#: Room right of the last column for the labels of its self-loops.
RIGHT = 170
#: Room above the first row for the start dot.
TOP = 50
START_R = 9
LINE_H = 14
#: Beyond this many states in a column the file order is kept rather than trying every order.
MAX_PERMUTED = 6


@dataclass(frozen=True)
class Box:
    name: str
    x: float  # centre
    y: float

    def edge_towards(self, tx: float, ty: float) -> tuple[float, float]:
        """Where the line from the centre towards (tx, ty) leaves the box."""
        dx, dy = tx - self.x, ty - self.y
        if dx == 0 and dy == 0:
            return self.x, self.y
        t = min(BOX_W / 2 / abs(dx) if dx else math.inf, BOX_H / 2 / abs(dy) if dy else math.inf)
        return self.x + dx * t, self.y + dy * t


def layers(spec: Spec) -> list[list[str]]:
    """The states in columns: the initial state first, then by the fewest transitions needed to reach them."""
    depth = {spec.initial: 0}
    todo = deque([spec.initial])
    while todo:
        state = todo.popleft()
        for t in spec.transitions:
            if state in t.source:
                dest = t.dest_from(state)
                if dest not in depth:
                    depth[dest] = depth[state] + 1
                    todo.append(dest)
    last = max(depth.values())
    for name in spec.states:  # unreachable states still get drawn, after the rest
        depth.setdefault(name, last + 1)
    columns: list[list[str]] = [[] for _ in range(max(depth.values()) + 1)]
    for name in spec.states:
        columns[depth[name]].append(name)
    return [_ordered(col, spec) for col in columns if col]


def _ordered(column: list[str], spec: Spec) -> list[str]:
    if len(column) > MAX_PERMUTED:
        return column
    pairs = {(s, t.dest_from(s)) for t in spec.transitions for s in t.source}
    inside = [(a, b) for a, b in pairs if a != b and a in column and b in column]

    def skipped(order: tuple[str, ...]) -> int:
        return sum(abs(order.index(a) - order.index(b)) - 1 for a, b in inside)

    orders: list[tuple[str, ...]] = list(itertools.permutations(column))
    costs = [skipped(order) for order in orders]
    return list(orders[costs.index(min(costs))])


def svg(spec: Spec) -> str:
    """The diagram as an ``<svg>`` element (markup ready to insert as is)."""
    columns = layers(spec)
    widest = max(len(c) for c in columns)
    width = MARGIN * 2 + RIGHT + widest * BOX_W + (widest - 1) * COL_GAP
    height = MARGIN * 2 + TOP + len(columns) * BOX_H + (len(columns) - 1) * ROW_GAP
    boxes: dict[str, Box] = {}
    for i, layer in enumerate(columns):
        y = MARGIN + TOP + i * (BOX_H + ROW_GAP) + BOX_H / 2
        left = MARGIN + (width - RIGHT - 2 * MARGIN - (len(layer) * BOX_W + (len(layer) - 1) * COL_GAP)) / 2
        for j, name in enumerate(layer):
            boxes[name] = Box(name, left + j * (BOX_W + COL_GAP) + BOX_W / 2, y)

    edges: dict[tuple[str, str], list[str]] = {}
    for t in spec.transitions:
        for s in t.sources:
            label = t.trigger + (" (admin)" if t.admin else "")
            labels = edges.setdefault((s, t.dest_from(s)), [])
            if label not in labels:
                labels.append(label)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="diagram" viewBox="0 0 {width:.0f} {height:.0f}" '
           f'width="{width:.0f}" height="{height:.0f}" role="img" aria-labelledby="diagram-title">',
           '<title id="diagram-title">The workflow: states and the transitions between them</title>',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" markerHeight="8" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" class="arrowhead"/></marker></defs>']
    first = boxes[spec.initial]
    start_x, start_y = first.x, first.y - BOX_H / 2 - TOP
    drawn: list[tuple[str, str]] = []
    for (source, dest), labels in edges.items():
        if source not in boxes:  # the creating transition: from the start dot
            drawn.append(_arrow_from_start(start_x, start_y, boxes[dest], labels))
        elif source == dest:
            drawn.append(_loop(boxes[source], labels))
        else:
            drawn.append(_arrow(boxes[source], boxes[dest], labels))
    # Every label after every line: a line drawn later would otherwise cross out an earlier arrow's label.
    out.extend(path for path, _ in drawn)
    out.extend(label for _, label in drawn)
    out.append(f'<circle class="start" cx="{start_x:.1f}" cy="{start_y:.1f}" r="{START_R}"><title>a new job'
               f'</title></circle>')
    for name, box in boxes.items():
        state = spec.states[name]
        kind = "state final" if state.final else "state"
        out.append(f'<g class="{kind}"><title>{escape(state.description)}</title>'
                   f'<rect x="{box.x - BOX_W / 2:.1f}" y="{box.y - BOX_H / 2:.1f}" width="{BOX_W}" '
                   f'height="{BOX_H}" rx="8"/>'
                   f'<text class="state-name" x="{box.x:.1f}" y="{box.y - 4:.1f}">{escape(name)}</text>'
                   f'<text class="state-title" x="{box.x:.1f}" y="{box.y + 14:.1f}">{escape(state.title)}</text>'
                   f'</g>')
    out.append("</svg>")
    return "\n".join(out)


def _label(x: float, y: float, labels: list[str], anchor: str = "middle") -> str:
    first = y - (len(labels) - 1) * LINE_H / 2
    spans = "".join(f'<tspan x="{x:.1f}" y="{first + i * LINE_H + 4:.1f}">{escape(text)}</tspan>'
                    for i, text in enumerate(labels))
    return f'<text class="edge-label {anchor}" x="{x:.1f}" y="{first:.1f}">{spans}</text>'


def _arrow(a: Box, b: Box, labels: list[str]) -> tuple[str, str]:
    dx, dy = b.x - a.x, b.y - a.y
    dist = math.hypot(dx, dy)
    # Bent to the left of its direction, so the arrows of a pair of states going both ways do not overlap;
    # the longer the arrow, the more it bends, to clear the boxes it passes.
    bend = 36 + dist * 0.12
    nx, ny = -dy / dist, dx / dist
    cx, cy = (a.x + b.x) / 2 + nx * bend, (a.y + b.y) / 2 + ny * bend
    x1, y1 = a.edge_towards(cx, cy)
    x2, y2 = b.edge_towards(cx, cy)
    # The label sits on the curve a little before its middle: two arrows crossing diagonally meet at their
    # middles, and their labels would cover each other there.
    t = 0.4
    mx = (1 - t) ** 2 * x1 + 2 * (1 - t) * t * cx + t**2 * x2
    my = (1 - t) ** 2 * y1 + 2 * (1 - t) * t * cy + t**2 * y2
    if abs(dy) > abs(dx):  # mostly vertical: the label beside the curve, on the side it bends to
        label = _label(mx + 6 if nx > 0 else mx - 6, my, labels, "left" if nx > 0 else "right")
    else:  # mostly horizontal: above or below it
        shift = (len(labels) * LINE_H / 2 + 4) * (1 if ny > 0 else -1)
        label = _label(mx, my + shift, labels)
    title = escape(f"{a.name} → {b.name}: {', '.join(labels)}")
    return (f'<g class="edge"><title>{title}</title>'
            f'<path d="M {x1:.1f} {y1:.1f} Q {cx:.1f} {cy:.1f} {x2:.1f} {y2:.1f}" marker-end="url(#arrow)"/></g>',
            f'<g><title>{title}</title>{label}</g>')


def _arrow_from_start(x: float, y: float, b: Box, labels: list[str]) -> tuple[str, str]:
    y2 = b.y - BOX_H / 2
    title = escape("new job → " + b.name + ": " + ", ".join(labels))
    return (f'<g class="edge"><title>{title}</title>'
            f'<path d="M {x:.1f} {y + START_R:.1f} L {b.x:.1f} {y2:.1f}" marker-end="url(#arrow)"/></g>',
            f'<g><title>{title}</title>{_label(x + 8, (y + y2) / 2, labels, "left")}</g>')


def _loop(box: Box, labels: list[str]) -> tuple[str, str]:
    # On the right side: arrows between columns leave from the top and bottom.
    right = box.x + BOX_W / 2
    title = escape(f"{box.name} stays {box.name}: {', '.join(labels)}")
    return (f'<g class="edge loop"><title>{title}</title>'
            f'<path d="M {right:.1f} {box.y - 12:.1f} C {right + 44:.1f} {box.y - 34:.1f} {right + 44:.1f} '
            f'{box.y + 34:.1f} {right:.1f} {box.y + 12:.1f}" marker-end="url(#arrow)"/></g>',
            f'<g><title>{title}</title>{_label(right + 40, box.y, labels, "left")}</g>')
