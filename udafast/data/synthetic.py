"""The embedded benchmark `synthetic`: procedurally generated street scenes, no download.

Each sample is a street seen from a car: sky above a horizon, a road narrowing to a vanishing
point with a dashed centre line, sidewalks beside it, facades (buildings, walls, fences, trees)
along both sides, and objects standing on the ground — cars, trucks and buses on the road, persons
on the sidewalks, riders on bicycles or motorcycles, poles carrying traffic signs and lights,
street trees — sized by their depth and painted far to near. Labels are the 19 Cityscapes train
ids (every pixel has a class; 255 never occurs).

Two domains share that layout and those shapes but not their look or statistics, as GTA5 and
Cityscapes do: `source` is sunny, saturated, lightly textured and sharp, with few small cars and
many persons; `target` is darker, greyer, overcast, textured (windows, foliage, asphalt grain),
noisy and blurred, with more and bigger cars, more trucks and buses, and few persons.

Sample `index` of (`domain`, `split`) is generated from its own seed, `SeedSequence([seed,
domain, split, index])`, so any sample can be drawn in any order, by any worker, identically.
Images are quantised to 8 bits like real photographs (so a cached sample equals a regenerated one).

    build_dataset("synthetic", None, "train", domain="source")                 # labelled
    build_dataset("synthetic", None, "train", domain="target")                 # unlabelled
    build_dataset("synthetic", None, "train", domain="target", with_labels=True)  # the oracle's
    build_dataset("synthetic", None, "val", domain="target")                   # labelled
"""
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from udafast.data.datasets import register_dataset

__all__ = ["SyntheticStreets", "DOMAINS", "SPLITS", "generate"]

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR,
 TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)

DOMAINS = ("source", "target")
#: the splits of each domain and whether they are labelled
SPLITS = {"source": {"train": True}, "target": {"train": False, "val": True}}
_DOMAIN_IDS = {"source": 0, "target": 1}
_SPLIT_IDS = {"train": 0, "val": 1}
_DEFAULT_LENGTH = {"train": 2000, "val": 200}
_MIN_SIZE = 32


@dataclass(frozen=True)
class _Style:
    """How a domain looks (palette, lighting, texture, noise, blur) and what it holds (object
    counts and scales); the layout rules are the same for both."""
    palette: dict             # class -> [k, 3] base RGB colours in [0, 1] (persons, riders, cars: object_colours)
    object_colours: np.ndarray  # [k, 3]: the colours of cars and clothes
    jitter: float             # per-instance colour jitter (std)
    saturation: float         # 1 = as the palette; < 1 mixes towards grey
    brightness: Tuple[float, float]
    cast: float               # std of a per-image colour cast
    texture: float            # strength of the class textures (windows, foliage, grain)
    noise: Tuple[float, float]  # range of the std of the per-pixel noise
    blur: float               # Gaussian blur sigma in pixels (0 = sharp)
    sky_gradient: float
    cars: Tuple[int, int]
    car_scale: Tuple[float, float]
    big_vehicle_p: float
    persons: Tuple[int, int]
    person_scale: Tuple[float, float]
    riders: Tuple[int, int]
    poles: Tuple[int, int]
    trees: Tuple[int, int]
    vegetation_p: float       # chance that a facade block is a tree block


def _rgb(*values):
    return np.array(values, dtype=np.float32)


def _palette(table):
    """class -> [k, 3] float32: the k base colours an instance of the class is drawn from."""
    return {cls: np.array(colours, dtype=np.float32).reshape(-1, 3) for cls, colours in table.items()}


# GTA5-like: sunny, saturated, warm, clean.
_SOURCE = _Style(
    palette=_palette({
        ROAD: [(.30, .30, .33), (.38, .36, .36)],
        SIDEWALK: [(.78, .64, .48), (.70, .70, .68), (.62, .52, .45)],
        BUILDING: [(.78, .42, .28), (.85, .78, .60), (.60, .62, .70), (.90, .88, .82), (.55, .45, .40)],
        WALL: [(.80, .78, .52), (.70, .65, .60)],
        FENCE: [(.58, .38, .20), (.35, .35, .38)],
        POLE: [(.20, .20, .22), (.45, .45, .45)],
        LIGHT: [(.10, .12, .10)],
        SIGN: [(.98, .82, .05), (.90, .15, .10), (.15, .35, .85)],
        VEGETATION: [(.18, .68, .12), (.30, .55, .15)],
        TERRAIN: [(.58, .80, .22), (.55, .50, .30)],
        SKY: [(.30, .58, .98), (.55, .75, .98)],
        TRUCK: [(.85, .85, .85), (.70, .20, .15)],
        BUS: [(.95, .75, .10), (.20, .45, .80)],
        MOTORCYCLE: [(.10, .10, .10), (.70, .10, .10)],
        BICYCLE: [(.10, .50, .90), (.10, .10, .10)]}),
    object_colours=_palette({0: [(.90, .10, .10), (.10, .30, .90), (.95, .85, .10), (.10, .75, .25), (.95, .95, .95),
                                 (.90, .45, .05), (.55, .10, .70), (.15, .15, .15)]})[0],
    jitter=0.06, saturation=1.0, brightness=(0.75, 1.2), cast=0.03, texture=0.35, noise=(0.0, 0.015),
    blur=0.0, sky_gradient=0.25, cars=(1, 3), car_scale=(0.7, 0.95), big_vehicle_p=0.1,
    persons=(3, 7), person_scale=(0.9, 1.1), riders=(0, 2), poles=(2, 5), trees=(0, 2), vegetation_p=0.3)

# Cityscapes-like: overcast, muted, grey, textured, noisy and soft.
_TARGET = _Style(
    palette=_palette({
        ROAD: [(.50, .46, .52), (.42, .40, .44)],
        SIDEWALK: [(.62, .58, .60), (.58, .52, .48)],
        BUILDING: [(.52, .50, .47), (.70, .66, .58), (.40, .40, .42), (.80, .78, .74), (.60, .45, .38)],
        WALL: [(.62, .60, .55), (.55, .55, .52)],
        FENCE: [(.42, .40, .36), (.30, .32, .30)],
        POLE: [(.40, .40, .42), (.25, .25, .27)],
        LIGHT: [(.18, .18, .16)],
        SIGN: [(.80, .80, .85), (.75, .20, .18), (.20, .35, .70)],
        VEGETATION: [(.30, .40, .20), (.25, .35, .18)],
        TERRAIN: [(.52, .56, .34), (.50, .48, .36)],
        SKY: [(.70, .78, .88), (.62, .72, .86), (.80, .84, .88)],
        TRUCK: [(.70, .70, .68), (.35, .38, .45)],
        BUS: [(.80, .80, .75), (.55, .25, .22)],
        MOTORCYCLE: [(.15, .15, .15), (.40, .40, .42)],
        BICYCLE: [(.20, .20, .22), (.35, .30, .25)]}),
    object_colours=_palette({0: [(.15, .15, .17), (.85, .85, .85), (.45, .46, .48), (.20, .25, .40), (.55, .20, .18),
                                 (.65, .65, .62), (.30, .28, .24), (.10, .10, .10)]})[0],
    jitter=0.04, saturation=0.85, brightness=(0.8, 1.0), cast=0.05, texture=0.7, noise=(0.01, 0.03),
    blur=0.9, sky_gradient=0.1, cars=(3, 7), car_scale=(1.0, 1.3), big_vehicle_p=0.15,
    persons=(0, 2), person_scale=(0.9, 1.1), riders=(0, 2), poles=(2, 5), trees=(1, 4), vegetation_p=0.4)

_STYLES = {"source": _SOURCE, "target": _TARGET}


class _Canvas:
    """A label map and an instance map; every painted shape is one instance with its own colour."""

    def __init__(self, h, w, sky_colour):
        self.h, self.w = h, w
        self.label = np.full((h, w), SKY, np.uint8)
        self.instance = np.zeros((h, w), np.int32)
        self.colours = [sky_colour]

    def _box(self, y0, y1, x0, x1):
        return (max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), self.h),
                max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), self.w))

    def paint(self, box, mask_fn, cls, colour):
        """Paint class `cls` where `mask_fn(yy, xx)` (pixel-centre coordinates over `box` = (y0,
        y1, x0, x1)) is true; `mask_fn` None fills the whole box."""
        y0, y1, x0, x1 = self._box(*box)
        if y0 >= y1 or x0 >= x1:
            return
        k = len(self.colours)
        self.colours.append(colour)
        if mask_fn is None:
            self.label[y0:y1, x0:x1] = cls
            self.instance[y0:y1, x0:x1] = k
            return
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
        mask = np.broadcast_to(mask_fn(yy, xx), (y1 - y0, x1 - x0))
        self.label[y0:y1, x0:x1][mask] = cls
        self.instance[y0:y1, x0:x1][mask] = k

    def rect(self, y0, y1, x0, x1, cls, colour):
        # at least one pixel wide / tall, so that far poles stay visible
        if x1 - x0 < 1:
            c = (x0 + x1) / 2
            x0, x1 = c - 0.5, c + 0.5
        if y1 - y0 < 1:
            c = (y0 + y1) / 2
            y0, y1 = c - 0.5, c + 0.5
        self.paint((round(y0), round(y1), round(x0), round(x1)), None, cls, colour)

    def ellipse(self, cy, cx, ry, rx, cls, colour):
        ry, rx = max(ry, 0.6), max(rx, 0.6)
        self.paint((cy - ry, cy + ry, cx - rx, cx + rx),
                   lambda yy, xx: ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1, cls, colour)

    def trapezoid(self, y0, y1, top, bottom, cls, colour):
        """Rows y0..y1, x from `top` = (left, right) at y0 to `bottom` at y1."""
        def mask(yy, xx):
            t = (yy - y0) / max(y1 - y0, 1e-3)
            return (xx >= top[0] + t * (bottom[0] - top[0])) & (xx < top[1] + t * (bottom[1] - top[1]))
        self.paint((y0, y1, min(top[0], bottom[0]), max(top[1], bottom[1])), mask, cls, colour)


class _Scene:
    """Draws one scene's layout onto a canvas with a domain's colours and object statistics."""

    def __init__(self, rng, h, w, style):
        self.rng, self.h, self.w, self.style = rng, h, w, style
        # the colour jitter of up to 256 instances, drawn at once (one draw per shape is slow)
        self._jitter = iter(rng.normal(0, style.jitter, (256, 3)).astype(np.float32))
        self.canvas = _Canvas(h, w, self.colour(SKY))
        self.horizon = h * rng.uniform(0.36, 0.5)
        self.vx = w * rng.uniform(0.35, 0.65)             # vanishing point column
        self.road_left = w * rng.uniform(0.3, 0.55)      # road half-widths at the bottom row
        self.road_right = w * rng.uniform(0.3, 0.55)
        self.walk_left = w * rng.uniform(0.12, 0.3)      # sidewalk widths at the bottom row
        self.walk_right = w * rng.uniform(0.12, 0.3)

    # --- colours ---------------------------------------------------------------------------
    def colour(self, cls, base=None):
        """A jittered colour: one of class `cls`'s base colours, or `base`."""
        if base is None:
            choices = self.style.palette[cls]
            base = choices[self.rng.integers(len(choices))] if len(choices) > 1 else choices[0]
        return np.clip(base + next(self._jitter, 0), 0, 1)

    def object_colour(self):
        colours = self.style.object_colours
        return self.colour(None, colours[self.rng.integers(len(colours))])

    # --- geometry --------------------------------------------------------------------------
    def row(self, d):
        """The image row at depth `d` (0 at the horizon, 1 at the bottom row)."""
        return self.horizon + d * (self.h - self.horizon)

    def road_edges(self, d):
        return self.vx - d * self.road_left, self.vx + d * self.road_right

    def road_width(self, d):
        return d * (self.road_left + self.road_right)

    def draw(self):
        self.facades()
        self.ground()
        objects = self.objects()
        for d, draw in sorted(objects, key=lambda o: o[0]):  # far to near: near ones occlude
            draw(d)
        return self.canvas

    def facades(self):
        """Blocks along both sides whose top edges converge to the vanishing point, from the
        horizon up; buildings, walls and fences reach down to the ground, tree blocks stand on grass."""
        rng, c = self.rng, self.canvas
        for side in (-1, 1):
            edge = 0.0 if side < 0 else float(self.w)
            x = edge
            span = abs(self.vx - edge)
            while (x - self.vx) * side > 0.04 * self.w:
                near = abs(x - self.vx) / max(span, 1)
                width = self.w * rng.uniform(0.05, 0.18) * (0.3 + near)
                x_next = x - side * width
                x0, x1 = sorted((x, x_next))
                kind = rng.random()
                slope = rng.uniform(0.25, 1.1)                 # top-edge slope: the block's height
                lift = self.h * rng.uniform(0.02, 0.08)
                vx, horizon = self.vx, self.horizon
                if kind < self.style.vegetation_p:
                    lift *= 0.6
                    top = lambda yy, xx, s=slope * 0.6, up=lift: yy >= horizon - up - s * np.abs(xx - vx) * (
                        1 + 0.15 * np.sin(xx * 0.9) * np.sin(xx * 0.37))
                    c.paint((0, self.h, x0, x1), top, VEGETATION, self.colour(VEGETATION))
                    c.paint((horizon + 1, self.h, x0, x1), None, TERRAIN, self.colour(TERRAIN))
                elif kind < self.style.vegetation_p + 0.12:
                    cls = WALL if rng.random() < 0.5 else FENCE
                    low = lambda yy, xx, s=slope * 0.3, up=lift * 0.5: yy >= horizon - up - s * np.abs(xx - vx)
                    c.paint((0, self.h, x0, x1), low, cls, self.colour(cls))
                else:
                    top = lambda yy, xx, s=slope, up=lift: yy >= horizon - up - s * np.abs(xx - vx)
                    c.paint((0, self.h, x0, x1), top, BUILDING, self.colour(BUILDING))
                x = x_next

    def ground(self):
        """Road (with a dashed centre line) and sidewalks over the lower half."""
        c, h0 = self.canvas, self.horizon
        vx, rl, rr, wl, wr = self.vx, self.road_left, self.road_right, self.walk_left, self.walk_right

        def depth(yy):
            return (yy - h0) / (self.h - h0)

        c.paint((h0, self.h, 0, self.w),
                lambda yy, xx: (xx >= vx - depth(yy) * (rl + wl)) & (xx < vx + depth(yy) * (rr + wr)),
                SIDEWALK, self.colour(SIDEWALK))
        c.paint((h0, self.h, 0, self.w),
                lambda yy, xx: (xx >= vx - depth(yy) * rl) & (xx < vx + depth(yy) * rr), ROAD, self.colour(ROAD))
        if self.rng.random() < 0.8:
            shift = (rr - rl) / 2  # the line runs from the vanishing point to the road's middle
            period = self.rng.uniform(1.5, 3.0)
            c.paint((h0 + 2, self.h, 0, self.w),
                    lambda yy, xx: (np.abs(xx - vx - depth(yy) * shift) < 0.012 * depth(yy) * (rl + rr) + 0.3)
                    & (np.floor(period / np.maximum(depth(yy), 1e-3)) % 2 == 0),
                    ROAD, self.colour(None, self.style.palette[ROAD][0] * 0.4 + 0.55))

    # --- objects: (depth, draw(depth)) pairs ------------------------------------------------
    def objects(self):
        rng, s = self.rng, self.style
        out = []
        for _ in range(rng.integers(s.cars[0], s.cars[1] + 1)):
            out.append((rng.uniform(0.12, 0.95) ** 0.8, self.vehicle))
        for _ in range(rng.integers(s.persons[0], s.persons[1] + 1)):
            out.append((rng.uniform(0.15, 1.0), self.person))
        for _ in range(rng.integers(s.riders[0], s.riders[1] + 1)):
            out.append((rng.uniform(0.2, 0.9), self.rider))
        for _ in range(rng.integers(s.poles[0], s.poles[1] + 1)):
            out.append((rng.uniform(0.15, 0.9), self.pole))
        for _ in range(rng.integers(s.trees[0], s.trees[1] + 1)):
            out.append((rng.uniform(0.15, 0.8), self.tree))
        return out

    def on_road(self, d, margin):
        left, right = self.road_edges(d)
        return left + (right - left) * self.rng.uniform(margin, 1 - margin)

    def on_sidewalk(self, d, outer=False):
        left, right = self.road_edges(d)
        side = -1 if self.rng.random() < 0.5 else 1
        walk = d * (self.walk_left if side < 0 else self.walk_right)
        t = self.rng.uniform(0.75, 0.95) if outer else self.rng.uniform(0.15, 0.85)
        return (left - t * walk) if side < 0 else (right + t * walk)

    def vehicle(self, d):
        rng, c, s = self.rng, self.canvas, self.style
        yb, rw = self.row(d), self.road_width(d)
        scale = rng.uniform(*s.car_scale)
        if rng.random() < s.big_vehicle_p:
            cls = BUS if rng.random() < 0.5 else TRUCK
            w = rw * 0.36 * scale
            hgt = w * rng.uniform(1.0, 1.25)
        else:
            cls = CAR
            w = rw * rng.uniform(0.22, 0.3) * scale
            hgt = w * rng.uniform(0.7, 0.85)
        x = self.on_road(d, 0.5 * w / max(rw, 1) + 0.02)
        body = self.object_colour() if cls == CAR else self.colour(cls)
        dark = self.colour(None, body * 0.25)
        if cls == CAR:
            c.rect(yb - 0.55 * hgt, yb - 0.12 * hgt, x - w / 2, x + w / 2, cls, body)
            c.trapezoid(yb - hgt, yb - 0.55 * hgt, (x - 0.33 * w, x + 0.33 * w), (x - 0.46 * w, x + 0.46 * w), cls,
                        body)
            c.trapezoid(yb - 0.92 * hgt, yb - 0.6 * hgt, (x - 0.27 * w, x + 0.27 * w), (x - 0.38 * w, x + 0.38 * w),
                        cls, dark)
        else:
            c.rect(yb - hgt, yb - 0.1 * hgt, x - w / 2, x + w / 2, cls, body)
            band = 0.35 if cls == BUS else 0.8
            c.rect(yb - 0.92 * hgt, yb - (0.92 - band * 0.5) * hgt, x - 0.45 * w, x + 0.45 * w, cls, dark)
        for side in (-1, 1):  # wheels
            c.rect(yb - 0.16 * hgt, yb, x + side * 0.42 * w - 0.07 * w, x + side * 0.42 * w + 0.07 * w, cls, dark)
        if cls == CAR:  # rear lights
            red = self.colour(None, _rgb(.8, .1, .1))
            for side in (-1, 1):
                c.rect(yb - 0.5 * hgt, yb - 0.4 * hgt, x + side * 0.38 * w - 0.06 * w, x + side * 0.38 * w + 0.06 * w,
                       cls, red)

    def _figure(self, x, yb, hgt, cls, colour, legs=True):
        c = self.canvas
        skin = self.colour(None, _rgb(.85, .65, .5) * (0.7 + 0.3 * self.style.saturation))
        c.rect(yb - 0.86 * hgt, yb - 0.5 * hgt, x - 0.16 * hgt, x + 0.16 * hgt, cls, colour)
        c.ellipse(yb - 0.92 * hgt, x, 0.08 * hgt, 0.065 * hgt, cls, skin)
        if legs:
            trousers = self.colour(None, colour * 0.5)
            for side in (-1, 1):
                c.rect(yb - 0.5 * hgt, yb, x + side * 0.09 * hgt - 0.055 * hgt, x + side * 0.09 * hgt + 0.055 * hgt,
                       cls, trousers)

    def person(self, d):
        hgt = self.road_width(d) * 0.3 * self.rng.uniform(*self.style.person_scale)
        self._figure(self.on_sidewalk(d), self.row(d), hgt, PERSON, self.object_colour())

    def rider(self, d):
        rng, c = self.rng, self.canvas
        yb, rw = self.row(d), self.road_width(d)
        hgt = rw * 0.3 * rng.uniform(*self.style.person_scale)
        x = self.on_road(d, 0.08)
        cls = BICYCLE if rng.random() < 0.6 else MOTORCYCLE
        frame = self.colour(cls)
        # seen from behind: a narrow upright wheel, the frame / body above it, the rider on top
        c.rect(yb - 0.45 * hgt, yb, x - 0.05 * hgt, x + 0.05 * hgt, cls, self.colour(None, _rgb(.08, .08, .08)))
        body_w = 0.12 if cls == BICYCLE else 0.22
        c.rect(yb - 0.55 * hgt, yb - 0.35 * hgt, x - body_w * hgt, x + body_w * hgt, cls, frame)
        c.rect(yb - 0.6 * hgt, yb - 0.55 * hgt, x - 0.3 * hgt, x + 0.3 * hgt, cls, frame)  # handlebar
        self._figure(x, yb - 0.4 * hgt, hgt * 0.75, RIDER, self.object_colour(), legs=False)

    def pole(self, d):
        rng, c = self.rng, self.canvas
        yb, rw = self.row(d), self.road_width(d)
        x = self.on_sidewalk(d, outer=rng.random() < 0.5)
        hgt = rw * rng.uniform(0.45, 0.75)
        width = max(1.5, rw * 0.025)
        top = yb - hgt
        c.rect(top, yb, x - width / 2, x + width / 2, POLE, self.colour(POLE))
        kind = rng.random()
        size = rw * rng.uniform(0.06, 0.1)
        if kind < 0.55:  # a traffic sign: a plate (round or square) near the top
            cy = top + size * rng.uniform(0.6, 2.0)
            if rng.random() < 0.5:
                c.ellipse(cy, x, size * 0.55, size * 0.55, SIGN, self.colour(SIGN))
            else:
                c.rect(cy - size * 0.5, cy + size * 0.5, x - size * 0.6, x + size * 0.6, SIGN, self.colour(SIGN))
        elif kind < 0.85:  # a traffic light: a dark box with a lit lamp
            box = self.colour(LIGHT)
            c.rect(top, top + size * 1.5, x - size * 0.3, x + size * 0.3, LIGHT, box)
            lamp = [_rgb(.9, .1, .1), _rgb(.95, .7, .1), _rgb(.1, .9, .3)][rng.integers(3)]
            cy = top + size * (0.3 + 0.45 * rng.integers(3))
            c.ellipse(cy, x, size * 0.18, size * 0.18, LIGHT, self.colour(None, lamp))

    def tree(self, d):
        rng, c = self.rng, self.canvas
        yb, rw = self.row(d), self.road_width(d)
        x = self.on_sidewalk(d, outer=True)
        hgt = rw * rng.uniform(0.5, 0.9)
        trunk = self.colour(None, _rgb(.35, .25, .15))
        c.rect(yb - 0.6 * hgt, yb, x - rw * 0.012 - 0.5, x + rw * 0.012 + 0.5, VEGETATION, trunk)
        crown = self.colour(VEGETATION)
        for _ in range(3):
            c.ellipse(yb - hgt * rng.uniform(0.65, 0.85), x + hgt * rng.uniform(-0.15, 0.15),
                      hgt * rng.uniform(0.18, 0.28), hgt * rng.uniform(0.2, 0.32), VEGETATION, crown)


def _blur(image, sigma):
    """Separable Gaussian blur of a float32 [C, H, W] array (edges replicated)."""
    radius = max(1, int(np.ceil(2 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    for axis in (1, 2):
        n = image.shape[axis]
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(image, pad, mode="edge")
        window = (lambda i: padded[:, i:i + n]) if axis == 1 else (lambda i: padded[:, :, i:i + n])
        image = taps[0] * window(0)
        for i in range(1, len(taps)):
            image += taps[i] * window(i)
    return image


def _smooth_noise(rng, h, w, cell):
    """Blotchy noise of std ~1: a coarse grid of normals, bilinearly upsampled."""
    coarse = rng.standard_normal((-(-h // cell) + 1, -(-w // cell) + 1), dtype=np.float32)
    up = F.interpolate(torch.from_numpy(coarse)[None, None], scale_factor=cell, mode="bilinear", align_corners=True)
    return up[0, 0, :h, :w].numpy() * 1.5


def _uniform_noise(rng, shape, std):
    """Zero-mean uniform noise of standard deviation `std` (cheaper than Gaussian, looks the same)."""
    return (rng.random(shape, dtype=np.float32) - 0.5) * np.float32(std * 12 ** 0.5)


def _class_table(values):
    table = np.zeros(256, np.float32)
    for cls, v in values.items():
        table[cls] = v
    return table


# texture amplitudes per class (times the style's `texture`): blotches (foliage, stains), grain
_BLOTCH = _class_table({VEGETATION: 0.25, TERRAIN: 0.25, ROAD: 0.06, SIDEWALK: 0.06, BUILDING: 0.05, WALL: 0.05,
                        SKY: 0.06})
_GRAIN = _class_table({VEGETATION: 0.12, TERRAIN: 0.12, ROAD: 0.08, SIDEWALK: 0.08, WALL: 0.04})


def _render(canvas, rng, style):
    """The RGB image (float32 [3, H, W] in [0, 1]) of a drawn canvas in a domain's style."""
    h, w = canvas.h, canvas.w
    label = canvas.label
    image = np.stack(canvas.colours, 1)[:, canvas.instance]
    yy = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h
    xx = np.arange(w, dtype=np.float32)[None, :]
    # the sky lightens towards the horizon
    image += style.sky_gradient * yy * (label == SKY)
    if style.texture > 0:
        t = style.texture
        shade = 1 + t * (_BLOTCH[label] * _smooth_noise(rng, h, w, max(2, w // 40))
                         + _GRAIN[label] * _uniform_noise(rng, (h, w), 1.0))
        # building windows: a grid of darker cells, sized with the image
        cell_y, cell_x = rng.uniform(0.025, 0.05) * h, rng.uniform(0.015, 0.03) * w
        windows = ((yy * h / cell_y) % 1 < 0.5) & ((xx / cell_x) % 1 < 0.55)
        shade -= 0.35 * t * ((label == BUILDING) & windows)
        image *= shade
    # desaturate, then light the scene: brightness, a vertical fall-off and a colour cast
    grey = image.mean(0)
    image = grey + style.saturation * (image - grey)
    light = rng.uniform(*style.brightness) * (1 - 0.15 * (1 - style.saturation) * yy)
    cast = 1 + rng.normal(0, style.cast, (3, 1, 1)).astype(np.float32)
    image *= light * cast
    if style.blur > 0:
        image = _blur(image, style.blur * rng.uniform(0.8, 1.2))
    sigma = rng.uniform(*style.noise)
    if sigma > 0:
        image += _uniform_noise(rng, image.shape, sigma)
    return np.clip(image, 0, 1, out=image)


def generate(seed, domain="source", size=(128, 256)):
    """One scene: (image uint8 [3, H, W], label uint8 [H, W] train ids) from `seed` (an int or a
    sequence of ints, as `numpy.random.SeedSequence` takes)."""
    if domain not in _STYLES:
        raise ValueError(f"domain: expected one of {DOMAINS}, got {domain!r}")
    h, w = _check_size(size)
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    style = _STYLES[domain]
    canvas = _Scene(rng, h, w, style).draw()
    image = _render(canvas, rng, style)
    return (image * 255 + 0.5).astype(np.uint8), canvas.label


def _check_size(size):
    try:
        h, w = (int(v) for v in size)
        ok = all(int(v) == v for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size: expected (H, W), got {size!r}") from None
    if not ok or h < _MIN_SIZE or w < _MIN_SIZE:
        raise ValueError(f"size: expected integers (H, W) of at least {_MIN_SIZE}, got {size!r}")
    return h, w


_CACHES = {}


@register_dataset("synthetic")
class SyntheticStreets(Dataset):
    """Generated street scenes (see the module docstring). `root` is unused (nothing is read);
    `domain` "source" (split "train", labelled) or "target" (split "train", unlabelled unless
    `with_labels`, and "val", labelled); `size` (H, W); `length` samples (default 2000 for train,
    200 for val); `seed` picks another draw of the whole benchmark; `cache` keeps generated
    samples in memory (about H * W * 4 bytes each)."""

    def __init__(self, root=None, split="train", transform=None, domain="source", size=(128, 256), length=None,
                 with_labels=None, seed=0, cache=False):
        if domain not in SPLITS:
            raise ValueError(f"domain: expected one of {DOMAINS}, got {domain!r}")
        if split not in SPLITS[domain]:
            raise ValueError(f"split: the synthetic {domain} domain has the splits {tuple(SPLITS[domain])}, "
                             f"got {split!r}")
        if length is None:
            length = _DEFAULT_LENGTH[split]
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length: expected a positive int, got {length!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        if with_labels not in (None, True, False):
            raise ValueError(f"with_labels: expected None, True or False, got {with_labels!r}")
        self.root = root
        self.split, self.domain, self.transform = split, domain, transform
        self.size = _check_size(size)
        self.length, self.seed = length, seed
        self.labelled = SPLITS[domain][split] if with_labels is None else with_labels
        # one cache per (seed, domain, split, size), shared by every instance in the process, so that
        # the runs of a comparison generate each scene once
        self._cache = _CACHES.setdefault((seed, domain, split, self.size), {}) if cache else None

    def __len__(self):
        return self.length

    def sample_seed(self, index):
        """The seed of sample `index`: a function of (seed, domain, split, index) only."""
        return [self.seed, _DOMAIN_IDS[self.domain], _SPLIT_IDS[self.split], index]

    def _generate(self, index):
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        out = generate(self.sample_seed(index), self.domain, self.size)
        if self._cache is not None:
            self._cache[index] = out
        return out

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index = int(index) % len(self)
        image, label = self._generate(index)
        sample = {"image": torch.from_numpy(image).float().div_(255),
                  "name": f"synthetic_{self.domain}_{self.split}_{index:06d}.png"}
        if self.labelled:
            sample["label"] = torch.from_numpy(label.astype(np.int64))
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def __repr__(self):
        return (f"SyntheticStreets(domain={self.domain!r}, split={self.split!r}, size={self.size}, "
                f"{len(self)} samples, {'labelled' if self.labelled else 'unlabelled'})")
