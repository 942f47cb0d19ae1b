"""Synthetic face renderer: identity-specific faces under pose, light, expression, blur and clutter.

Rendering is analytic and batched. Every part of a face (outline, ears, hair, eyes, brows, nose,
mouth, marks, glasses, occluders) is an ellipse or a rectangle in *face coordinates*, the frame of
the 112×112 alignment template (docs/evaluation.md, Protocol). A view poses the face (yaw and pitch squeeze the face and
shift each part by its depth, a simple parallax) and a per-image similarity carries it to image
pixels. Each part is drawn with an anti-aliased edge whose width also models defocus blur, so a
whole batch is rendered with a few dozen array operations and no per-image loop.

Landmarks (left eye, right eye, nose, left and right mouth corner) are the pupil centres, the nose
tip centre and the mouth corners, mapped by the same maps as the drawing: listed points are exactly
where those features are drawn. Pixel centres sit at integer coordinates, as in ``cv2.warpAffine``.

Parameters are dicts of float32 arrays with a leading batch axis: :func:`sample_identities` draws
what makes a person (geometry, colours, hair style, marks, texture, glasses), :func:`sample_views`
what changes between photos (pose, expression, lighting, blur, noise, occlusion, background).
"""
import numpy as np

TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)
FACE_CENTRE = np.array([56.0, 66.0], np.float32)   # pivot of yaw/pitch, face coordinates
DEPTH = dict(hair_back=-15.0, ears=-12.0, neck=-5.0, face=0.0, skin_marks=6.0, hair_top=6.0, eyes=8.0,
             brows=9.0, mouth=10.0, bridge=14.0, glasses=16.0, nostrils=17.0, nose_shadow=18.0,
             nose_tip=20.0, occluder=30.0)
LANDMARK_DEPTH = np.array([DEPTH["eyes"], DEPTH["eyes"], DEPTH["nose_tip"], DEPTH["mouth"], DEPTH["mouth"]],
                          np.float32)

SKIN = np.array([[255, 224, 196], [241, 194, 167], [224, 172, 105], [198, 134, 66], [141, 85, 36],
                 [92, 58, 38], [255, 205, 180], [230, 188, 152]], np.float32)
HAIR = np.array([[20, 18, 18], [60, 40, 30], [110, 75, 45], [170, 130, 80], [225, 195, 135],
                 [150, 60, 30], [125, 125, 125], [225, 225, 220]], np.float32)
IRIS = np.array([[70, 45, 25], [115, 78, 40], [60, 100, 165], [80, 135, 90], [120, 130, 140], [30, 25, 20]],
                np.float32)
FRAMES = np.array([[20, 20, 20], [90, 60, 30], [170, 170, 180], [150, 30, 40], [30, 50, 140]], np.float32)

_F = np.float32


# ---------------------------------------------------------------------------------------------
# parameter sampling
# ---------------------------------------------------------------------------------------------
def _uniform(rng, lo, hi, shape):
    return rng.uniform(lo, hi, shape).astype(_F)


def _flag(rng, p, shape):
    return (rng.random(shape) < p).astype(_F)


def _palette(rng, colours, n, spread):
    """Colours drawn between two random palette entries, plus Gaussian spread (n×3)."""
    a = colours[rng.integers(len(colours), size=n)]
    b = colours[rng.integers(len(colours), size=n)]
    mix = rng.uniform(0, 0.5, (n, 1))
    return np.clip(a + (b - a) * mix + rng.normal(0, spread, (n, 3)), 0, 255).astype(_F)


def sample_identities(rng, n):
    """Parameters of ``n`` identities (dict of float32 arrays, leading axis n)."""
    def u(lo, hi, *shape):
        return _uniform(rng, lo, hi, (n, *shape))

    skin = _palette(rng, SKIN, n, 8)
    hair = _palette(rng, HAIR, n, 10)
    dyed = rng.random(n) < 0.08
    hair[dyed] = _uniform(rng, 0, 255, (int(dyed.sum()), 3))
    bald = _flag(rng, 0.08, n)
    lips = np.clip(skin * u(0.62, 0.85, 1) + np.array([35, -10, -5], _F), 0, 255)
    return dict(
        eye_dx=np.clip(rng.normal(17.6, 1.4, n), 14.5, 21).astype(_F),
        eye_y=rng.normal(51.6, 2.0, n).astype(_F),
        nose_x=rng.normal(56.0, 0.8, n).astype(_F),
        nose_y=rng.normal(72.0, 2.5, n).astype(_F),
        nose_w=u(6.5, 11),
        mouth_y=rng.normal(92.3, 2.5, n).astype(_F),
        mouth_dx=np.clip(rng.normal(14.6, 1.6, n), 11, 19).astype(_F),
        lip_h=u(2.3, 4.8),
        face_cy=rng.normal(64.0, 2.5, n).astype(_F),
        face_a=u(33, 43), face_b=u(47, 56), jaw=u(0.0, 0.45),
        ear_w=u(4, 7), ear_h=u(8, 13), ear_dy=u(-2, 10),
        eye_w=u(5.5, 8), eye_h=u(2.8, 4.3), iris_r=u(2.4, 3.6),
        brow_dy=u(7, 11.5), brow_len=u(6.5, 10), brow_th=u(1.3, 3.4), brow_angle=u(-0.25, 0.2),
        brow_arch=u(0, 0.7),
        hair_back=(1 - bald) * _flag(rng, 0.85, n), hair_back_a=u(1.02, 1.35), hair_back_b=u(0.95, 1.3),
        hair_back_dy=u(-8, 24),
        hair_top=1 - bald, hairline=u(-0.8, -0.4), hairline_k=u(0, 0.9), hairline_part=u(-0.5, 0.5),
        hairline_slope=u(-0.25, 0.25),
        beard=_flag(rng, 0.25, n), beard_line=u(0.15, 0.45), beard_alpha=u(0.5, 0.9),
        mark=_flag(rng, 0.5, n), mark_pos=u(-0.55, 0.55, 2), mark_r=u(3, 8),
        mark_colour=np.clip(skin * u(0.55, 0.8, 1) + np.array([15, -5, -5], _F), 0, 255),
        mole=_flag(rng, 0.6, (n, 2)), mole_pos=u(-0.6, 0.6, 2, 2), mole_r=u(1.3, 2.4, 2),
        texture=u(0, 0.14), texture_wavelength=u(16, 40), texture_angle=u(0, np.pi), texture_phase=u(0, 2 * np.pi),
        glasses=_flag(rng, 0.2, n), glasses_colour=_palette(rng, FRAMES, n, 5),
        skin=skin, hair=hair, iris=_palette(rng, IRIS, n, 8), lips=lips,
        brows=np.clip(hair * 0.75 + skin * 0.1, 0, 255),
    )


def sample_views(rng, n):
    """Parameters of ``n`` photos (pose, expression, lighting, blur, noise, occlusion, background)."""
    def u(lo, hi, *shape):
        return _uniform(rng, lo, hi, (n, *shape))

    occ_bar = _flag(rng, 0.5, (n, 2))
    occ_size = np.where(occ_bar[..., None] > 0, np.stack([np.full((n, 2), 120, _F), u(1.5, 5, 2)], -1),
                        np.stack([u(8, 20, 2), u(6, 16, 2)], -1))
    return dict(
        yaw=np.clip(rng.normal(0, 0.26, n), -0.7, 0.7).astype(_F),
        pitch=np.clip(rng.normal(0, 0.14, n), -0.35, 0.35).astype(_F),
        eye_open=np.where(rng.random(n) < 0.1, u(0.15, 0.4), u(0.75, 1.15)),
        mouth_open=np.where(rng.random(n) < 0.6, 0, u(0.2, 1.0)).astype(_F),
        smile=u(-0.4, 1.2), brow_raise=u(-1.5, 2.5),
        skin_shift=u(0.92, 1.08), hair_shift=u(0.9, 1.1), glasses_on=_flag(rng, 0.85, n),
        light_gain=u(0.55, 1.3), light_grad=u(0, 0.75), light_angle=u(0, 2 * np.pi), contrast=u(0.65, 1.15),
        cast=u(0.82, 1.18, 3),
        blur=np.where(rng.random(n) < 0.3, 0, u(0.2, 2.0)).astype(_F), noise=u(1, 10), grey=_flag(rng, 0.06, n),
        occluder=(rng.random((n, 2)) < np.array([0.3, 0.12])).astype(_F),
        occluder_bar=occ_bar, occluder_centre=np.stack([u(20, 92, 2), u(35, 110, 2)], -1),
        occluder_size=occ_size.astype(_F), occluder_angle=u(0, np.pi, 2), occluder_colour=u(0, 255, 2, 3),
        background=u(0, 255, 3), background_far=u(0, 255, 3), background_angle=u(0, 2 * np.pi),
        background_texture=u(0, 40), background_wavelength=u(6, 40), background_texture_angle=u(0, np.pi),
        background_phase=u(0, 2 * np.pi),
        clutter=_flag(rng, 0.7, (n, 3)), clutter_centre=u(0, 1, 3, 2), clutter_axes=u(0.05, 0.35, 3, 2),
        clutter_angle=u(0, np.pi, 3), clutter_colour=u(0, 255, 3, 3),
        quality=rng.integers(75, 96, n).astype(_F),
    )


def perturb_views(views, rng):
    """Frames of a video: the same views with small changes of pose, expression, light and blur."""
    n = len(views["yaw"])
    out = dict(views)
    for key, spread, lo, hi in (("yaw", 0.05, -0.75, 0.75), ("pitch", 0.03, -0.4, 0.4), ("smile", 0.15, -0.5, 1.3),
                                ("eye_open", 0.08, 0.1, 1.2), ("mouth_open", 0.1, 0, 1),
                                ("light_gain", 0.03, 0.4, 1.4), ("blur", 0.15, 0, 2.2)):
        out[key] = np.clip(views[key] + rng.normal(0, spread, n), lo, hi).astype(_F)
    out["occluder_centre"] = (views["occluder_centre"] + rng.normal(0, 1.5, (n, 2, 2))).astype(_F)
    return out


def take(params, index):
    """Rows ``index`` of every array in a parameter dict."""
    return {key: value[index] for key, value in params.items()}


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
def face_landmarks(ident, view):
    """The five landmarks in face coordinates before posing (B×5×2)."""
    corner_y = ident["mouth_y"] - view["smile"] * ident["lip_h"]
    xs = np.stack([56 - ident["eye_dx"], 56 + ident["eye_dx"], ident["nose_x"],
                   56 - ident["mouth_dx"], 56 + ident["mouth_dx"]], 1)
    ys = np.stack([ident["eye_y"], ident["eye_y"], ident["nose_y"], corner_y, corner_y], 1)
    return np.stack([xs, ys], -1).astype(_F)


def pose_terms(view):
    """Per-photo posing (B×2 each): the squeeze (cos yaw, cos pitch) and the shift per unit of depth (sin)."""
    squeeze = np.stack([np.cos(view["yaw"]), np.cos(view["pitch"])], -1).astype(_F)
    shift = np.stack([np.sin(view["yaw"]), np.sin(view["pitch"])], -1).astype(_F)
    return squeeze, shift


def pose_points(points, view, depth):
    """Posed face coordinates of points (B×P×2) at ``depth`` (P,): squeeze by cos, shift by depth·sin."""
    squeeze, shift = pose_terms(view)
    depth = np.asarray(depth, _F)[None, :, None]
    return (FACE_CENTRE + squeeze[:, None] * (points - FACE_CENTRE) + depth * shift[:, None]).astype(_F)


def posed_landmarks(ident, view):
    """The five landmarks in posed face coordinates (B×5×2)."""
    return pose_points(face_landmarks(ident, view), view, LANDMARK_DEPTH)


def similarity_transform(src, dst):
    """Least-squares similarity (rotation, uniform scale, translation; Umeyama without reflection).

    ``src`` B×P×2, ``dst`` B×P×2 or P×2 → B×2×3 matrices mapping src onto dst (as
    ``skimage.transform.SimilarityTransform.estimate`` does).
    """
    src = np.asarray(src, np.float64)
    dst = np.broadcast_to(np.asarray(dst, np.float64), src.shape)
    mu_s, mu_d = src.mean(1, keepdims=True), dst.mean(1, keepdims=True)
    s, d = src - mu_s, dst - mu_d
    norm = (s ** 2).sum((1, 2))
    a = (s[..., 0] * d[..., 0] + s[..., 1] * d[..., 1]).sum(1) / norm
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(1) / norm
    lin = np.stack([np.stack([a, -b], -1), np.stack([b, a], -1)], 1)
    shift = mu_d[:, 0] - np.einsum("bij,bj->bi", lin, mu_s[:, 0])
    return np.concatenate([lin, shift[..., None]], -1).astype(_F)


def apply_transform(transform, points):
    """Points B×P×2 mapped by affine matrices B×2×3."""
    return (np.einsum("bij,bpj->bpi", transform[:, :, :2], points) + transform[:, None, :, 2]).astype(_F)


def compose(outer, inner):
    """Affine B×2×3 equal to applying ``inner`` then ``outer``."""
    lin = outer[:, :, :2] @ inner[:, :, :2]
    shift = np.einsum("bij,bj->bi", outer[:, :, :2], inner[:, :, 2]) + outer[:, :, 2]
    return np.concatenate([lin, shift[..., None]], -1).astype(_F)


def similarity(angle, scale, shift, centre):
    """B×2×3 similarity: rotate by ``angle`` and scale about ``centre`` (B×2 or 2), then shift."""
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    lin = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], 1)
    centre = np.broadcast_to(np.asarray(centre, _F), (len(angle), 2))
    offset = centre + shift - np.einsum("bij,bj->bi", lin, centre)
    return np.concatenate([lin, offset[..., None]], -1).astype(_F)


def face_boxes(ident, view, transform):
    """Bounding boxes (x, y, width, height; B×4) of the face outline in image pixels."""
    axes = np.stack([ident["face_a"], ident["face_b"]], -1) * pose_terms(view)[0]
    lin = transform[:, :, :2] * axes[:, None, :]
    half = np.sqrt((lin ** 2).sum(-1))
    centre = np.stack([np.full_like(ident["face_cy"], 56), ident["face_cy"]], -1)[:, None]
    posed = pose_points(centre, view, [DEPTH["face"]])
    mid = apply_transform(transform, posed)[:, 0]
    return np.concatenate([mid - half, 2 * half], -1).astype(_F)


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------
def _col(values):
    """B → B×1×1 for broadcasting over an H×W grid."""
    return np.asarray(values, _F)[:, None, None]


def _ramp(distance, soft):
    """Coverage of a pixel at signed ``distance`` (px, negative inside) from an edge ``soft`` px wide."""
    return np.clip(0.5 - distance / soft, 0, 1)


class _Shape:
    """One part: unit coordinates (u, v) of the pixels of a window under a per-image affine map.

    The window (``rows``, ``cols`` slices) is the union over the batch of the part's bounding
    boxes, so small parts cost only the pixels around them. With ``index`` the part exists only in
    those images of the batch, and every array of the part has one row per listed image.
    """

    def __init__(self, canvas, lin, offset, window=None, reach=(1.0, 1.0), index=None):
        self.index = index
        lin, offset, self.soft = self.pick(lin), self.pick(offset), self.pick(canvas.soft)
        if not len(lin):
            window = (slice(0, 0), slice(0, 0))
        elif window is None:
            extent = np.abs(lin) @ np.asarray(reach, _F)  # half width, half height of the box (B×2)
            margin = 2.0 * canvas.soft[:, 0, 0] + 1
            lo = np.floor((offset - extent).min(0) - margin.max())
            hi = np.ceil((offset + extent).max(0) + margin.max()) + 1
            window = (slice(int(np.clip(lo[1], 0, canvas.height)), int(np.clip(hi[1], 0, canvas.height))),
                      slice(int(np.clip(lo[0], 0, canvas.width)), int(np.clip(hi[0], 0, canvas.width))))
        self.window = window
        self.x, self.y = canvas.x[:, :, window[1]], canvas.y[:, window[0], :]
        inv = np.linalg.inv(lin.astype(np.float64)).astype(_F)
        self.a, self.b, self.c, self.d = (_col(inv[:, i, j]) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
        self.k = (-(inv[:, 0, 0] * offset[:, 0] + inv[:, 0, 1] * offset[:, 1]),
                  -(inv[:, 1, 0] * offset[:, 0] + inv[:, 1, 1] * offset[:, 1]))
        self.u = (self.a * self.x + _col(self.k[0])) + self.b * self.y
        self.v = (self.c * self.x + _col(self.k[1])) + self.d * self.y
        self.length = np.sqrt((lin ** 2).sum(1))  # px per unit along u and v (B×2)

    def pick(self, values):
        """The rows of a per-image array that belong to this part's images."""
        return values if self.index is None else np.asarray(values)[self.index]

    def ellipse(self, bend=None, taper=None):
        """Coverage of the unit disc; ``bend`` β curves it (v + β·u²), ``taper`` narrows its lower half."""
        u, v = self.u, self.v
        if taper is not None:
            u = u * (1 + _col(taper) * np.maximum(v, 0))
        if bend is not None:
            v = v + _col(bend) * u * u
            cu = u * (1 + 2 * _col(bend) * v)
        else:
            cu = u
        self.r2 = u * u + v * v
        gx = cu * self.a + v * self.c
        gy = cu * self.b + v * self.d
        distance = (self.r2 - 1) / (2 * np.sqrt(gx * gx + gy * gy) + 1e-6)
        return _ramp(distance, self.soft)

    def rect(self):
        """Coverage of the square |u| ≤ 1, |v| ≤ 1."""
        du = (np.abs(self.u) - 1) * _col(self.length[:, 0])
        dv = (np.abs(self.v) - 1) * _col(self.length[:, 1])
        return _ramp(np.maximum(du, dv), self.soft)

    def below(self, line, softness=1.0):
        """Coverage of v > ``line`` (B×1×1 or window-shaped, unit coordinates)."""
        return _ramp((line - self.v) * _col(self.length[:, 1]), self.soft * softness)

    def wave(self, kx, ky, k0):
        """cos(kx·x + ky·y + k0) over the window, from separable row/column factors."""
        ax = _col(kx) * self.x + _col(k0)
        by = _col(ky) * self.y
        return np.cos(ax) * np.cos(by) - np.sin(ax) * np.sin(by)


class _Canvas:
    """A batch of images being painted (B×3×H×W float32) and the maps that place the face in them."""

    def __init__(self, view, transform, height, width):
        self.lin, self.offset = transform[:, :, :2], transform[:, :, 2]
        self.view = view
        self.squeeze = pose_terms(view)[0]
        self.x = np.arange(width, dtype=_F)[None, None, :]
        self.y = np.arange(height, dtype=_F)[None, :, None]
        self.height, self.width = height, width
        self.scale = np.sqrt(np.abs(np.linalg.det(self.lin))).astype(_F)  # px per face unit
        self.blur = view["blur"] * self.scale
        self.soft = _col(0.8 + 2.0 * self.blur)
        self.full = _Shape(self, np.repeat(np.eye(2, dtype=_F)[None], len(transform), 0),
                           np.zeros((len(transform), 2), _F), window=(slice(0, height), slice(0, width)))
        self.img = None

    def part(self, centre, axes, depth, angle=None, window=None, reach=(1.0, 1.0), present=None):
        """A face part: unit disc/square mapped to ``centre`` (B×2) with semi-axes ``axes`` (B×2).

        ``window`` reuses another part's window; ``reach`` widens the box (a bent shape);
        ``present`` (B, 0/1) limits the part to some images.
        """
        axes = np.asarray(axes, _F)
        if angle is None:
            local = axes[:, None, :] * np.eye(2, dtype=_F)
        else:
            cos, sin = np.cos(angle), np.sin(angle)
            local = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], 1) * axes[:, None, :]
        lin = self.lin @ (self.squeeze[:, :, None] * local)
        posed = pose_points(np.asarray(centre, _F)[:, None], self.view, [depth])[:, 0]
        offset = np.einsum("bij,bj->bi", self.lin, posed) + self.offset
        return _Shape(self, lin.astype(_F), offset.astype(_F), window, reach, _index(present))

    def image_part(self, centre, axes, angle, present=None):
        """A part fixed in the image: centre and semi-axes in pixels (B×2), rotation ``angle``."""
        cos, sin = np.cos(angle), np.sin(angle)
        lin = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], 1) * axes[:, None, :]
        return _Shape(self, lin.astype(_F), centre.astype(_F), index=_index(present))

    def paint(self, shape, alpha, colour):
        """Blend ``colour`` (B×3, or a field shaped like ``alpha``) over ``shape``'s window.

        ``alpha`` is the coverage over the window, one row per image of the part.
        """
        if colour.ndim == 2:
            colour = shape.pick(colour)[:, :, None, None]
        if shape.index is None:
            region = self.img[:, :, shape.window[0], shape.window[1]]
            region += alpha[:, None] * (colour - region)
        else:
            where = (shape.index, slice(None), shape.window[0], shape.window[1])
            region = self.img[where]
            region += alpha[:, None] * (colour - region)
            self.img[where] = region

    def wave_amplitude(self, kx, ky):
        """Contrast left to a sinusoid of angular frequencies (kx, ky) per px by the Gaussian blur."""
        return np.exp(-0.5 * self.blur ** 2 * (kx ** 2 + ky ** 2))


def _index(present):
    return None if present is None else np.flatnonzero(np.asarray(present) > 0)


def _xy(x, y):
    return np.stack([np.broadcast_to(np.asarray(x, _F), np.shape(y)), np.asarray(y, _F)], -1)


def _grey(value, like):
    return np.broadcast_to(np.asarray(value, _F), like.shape)


def _reach(bend):
    return (1.0, 1.0 + float(np.abs(bend).max(initial=0)))


def _background(canvas, view):
    """Two-colour gradient, a blurred sinusoidal texture, two blobs and a bar."""
    h, w, full = canvas.height, canvas.width, canvas.full
    cos, sin = np.cos(view["background_angle"]), np.sin(view["background_angle"])
    span = float(max(h, w))
    ramp = np.clip(0.5 + (_col(cos / span) * (full.x - w / 2) + _col(sin / span) * (full.y - h / 2)), 0, 1)
    near, far = view["background"][:, :, None, None], view["background_far"][:, :, None, None]
    canvas.img = near + (far - near) * ramp[:, None]
    k = 2 * np.pi / view["background_wavelength"]
    kx, ky = k * np.cos(view["background_texture_angle"]), k * np.sin(view["background_texture_angle"])
    amp = view["background_texture"] * canvas.wave_amplitude(kx, ky)
    canvas.img += (_col(amp) * full.wave(kx, ky, view["background_phase"]))[:, None]
    size = float(min(h, w))
    for i in range(3):
        centre = view["clutter_centre"][:, i] * np.array([w, h], _F)
        shape = canvas.image_part(centre, view["clutter_axes"][:, i] * size, view["clutter_angle"][:, i],
                                  present=view["clutter"][:, i])
        canvas.paint(shape, shape.rect() if i == 2 else shape.ellipse(), view["clutter_colour"][:, i])


def _head(canvas, ident, view):
    """Hair behind, neck, ears, face (shaded, lit, textured), skin marks and beard."""
    skin = ident["skin"] * view["skin_shift"][:, None]
    hair = ident["hair"] * view["hair_shift"][:, None]
    fa, fb, cy = ident["face_a"], ident["face_b"], ident["face_cy"]
    back = canvas.part(_xy(56, cy + ident["hair_back_dy"]),
                       _xy(fa * ident["hair_back_a"], fb * ident["hair_back_b"]), DEPTH["hair_back"],
                       present=ident["hair_back"])
    canvas.paint(back, back.ellipse(), hair * 0.85)
    neck = canvas.part(_xy(56, cy + fb * 0.85 + 18), _xy(fa * 0.55, np.full_like(fa, 26)), DEPTH["neck"])
    canvas.paint(neck, neck.rect(), skin * 0.8)
    for side in (-1, 1):
        ear = canvas.part(_xy(56 + side * fa * 0.97, ident["eye_y"] + ident["ear_dy"]),
                          _xy(ident["ear_w"], ident["ear_h"]), DEPTH["ears"])
        canvas.paint(ear, ear.ellipse(), skin * 0.92)

    face = canvas.part(_xy(56, cy), _xy(fa, fb), DEPTH["face"])
    alpha = face.ellipse(taper=ident["jaw"])
    light = view["light_angle"] - np.arctan2(canvas.lin[:, 1, 0], canvas.lin[:, 0, 0])
    k = 2 * np.pi / ident["texture_wavelength"]
    ku, kv = k * np.cos(ident["texture_angle"]) * fa, k * np.sin(ident["texture_angle"]) * fb
    kx, ky = ku * face.a[:, 0, 0] + kv * face.c[:, 0, 0], ku * face.b[:, 0, 0] + kv * face.d[:, 0, 0]
    k0 = ku * face.k[0] + kv * face.k[1] + ident["texture_phase"]
    texture = _col(ident["texture"] * canvas.wave_amplitude(kx, ky)) * face.wave(kx, ky, k0)
    shade = (1 - 0.16 * face.r2 * face.r2 + texture
             + _col(0.3 * view["light_grad"] * np.cos(light)) * face.u
             + _col(0.3 * view["light_grad"] * np.sin(light)) * face.v)
    canvas.paint(face, alpha, skin[:, :, None, None] * shade[:, None])

    mark = canvas.part(_xy(56 + ident["mark_pos"][:, 0] * fa, cy + ident["mark_pos"][:, 1] * fb),
                       _xy(ident["mark_r"], ident["mark_r"] * 0.8), DEPTH["skin_marks"], present=ident["mark"])
    canvas.paint(mark, mark.ellipse() * 0.75, ident["mark_colour"])
    for i in range(2):
        pos, radius = ident["mole_pos"][:, i], ident["mole_r"][:, i]
        mole = canvas.part(_xy(56 + pos[:, 0] * fa, cy + pos[:, 1] * fb), _xy(radius, radius), DEPTH["skin_marks"],
                           present=ident["mole"][:, i])
        canvas.paint(mole, mole.ellipse() * 0.9, _grey([70, 45, 35], skin))
    beard = canvas.part(_xy(56, cy), _xy(fa, fb), DEPTH["face"], present=ident["beard"])
    alpha = (beard.ellipse(taper=beard.pick(ident["jaw"])) * _col(beard.pick(ident["beard_alpha"]))
             * beard.below(_col(beard.pick(ident["beard_line"])), softness=3.0))
    canvas.paint(beard, alpha, hair * 0.9)
    return skin, hair


def _eyes_and_brows(canvas, ident, view, skin):
    """Eye sockets, eyes (sclera, iris, pupil centred on the eye landmark) and eyebrows."""
    eyes_y, dx = ident["eye_y"], ident["eye_dx"]
    arch = -ident["brow_arch"]
    for side in (-1, 1):
        centre = _xy(56 + side * dx, eyes_y)
        socket = canvas.part(centre, _xy(ident["eye_w"] * 1.5, ident["eye_h"] * 1.9 + 1), DEPTH["eyes"])
        canvas.paint(socket, socket.ellipse() * 0.6, skin * 0.82)
        sclera = canvas.part(centre, _xy(ident["eye_w"], ident["eye_h"] * view["eye_open"]), DEPTH["eyes"],
                             window=socket.window)
        inside = sclera.ellipse()
        canvas.paint(sclera, inside, _grey([235, 235, 230], skin))
        iris = canvas.part(centre, _xy(ident["iris_r"], ident["iris_r"]), DEPTH["eyes"], window=socket.window)
        canvas.paint(iris, iris.ellipse() * inside, ident["iris"])
        pupil = canvas.part(centre, _xy(ident["iris_r"] * 0.45, ident["iris_r"] * 0.45), DEPTH["eyes"],
                            window=socket.window)
        canvas.paint(pupil, pupil.ellipse() * inside, _grey([15, 12, 12], skin))
        brow = canvas.part(_xy(56 + side * (dx + 0.5), eyes_y - ident["brow_dy"] - view["brow_raise"]),
                           _xy(ident["brow_len"], ident["brow_th"]), DEPTH["brows"], angle=side * ident["brow_angle"],
                           reach=_reach(arch))
        canvas.paint(brow, brow.ellipse(bend=arch), ident["brows"])


def _nose_and_mouth(canvas, ident, view, skin):
    """Nose (bridge, shadow, tip centred on the nose landmark, nostrils) and mouth (corners = landmarks)."""
    nx, ny, nw = ident["nose_x"], ident["nose_y"], ident["nose_w"]
    bridge = canvas.part(_xy(nx, (ident["eye_y"] + ny) / 2 + 2), _xy(nw * 0.28, (ny - ident["eye_y"]) / 2),
                         DEPTH["bridge"])
    canvas.paint(bridge, bridge.ellipse() * 0.45, skin * 0.88)
    shadow = canvas.part(_xy(nx, ny + nw * 0.55), _xy(nw * 0.55, nw * 0.2), DEPTH["nose_shadow"])
    canvas.paint(shadow, shadow.ellipse() * 0.6, skin * 0.7)
    tip = canvas.part(_xy(nx, ny), _xy(nw * 0.5, nw * 0.38), DEPTH["nose_tip"])
    canvas.paint(tip, tip.ellipse() * 0.7, np.clip(skin * 1.06, 0, 255))
    for side in (-1, 1):
        nostril = canvas.part(_xy(nx + side * nw * 0.45, ny + nw * 0.25), _xy(nw * 0.15, nw * 0.09), DEPTH["nostrils"])
        canvas.paint(nostril, nostril.ellipse(), _grey([50, 30, 25], skin))

    my, mdx, lip_h, opened = ident["mouth_y"], ident["mouth_dx"], ident["lip_h"], view["mouth_open"]
    lips_h = lip_h * (1 + 0.6 * opened)
    bend = view["smile"] * lip_h / lips_h
    lips = canvas.part(_xy(56, my), _xy(mdx, lips_h), DEPTH["mouth"], reach=_reach(bend))
    canvas.paint(lips, lips.ellipse(bend=bend), ident["lips"])
    inner_h = 0.45 + 0.85 * lip_h * opened
    inner = canvas.part(_xy(56, my), _xy(mdx * 0.8, inner_h), DEPTH["mouth"], window=lips.window)
    canvas.paint(inner, inner.ellipse(bend=view["smile"] * lip_h * 0.64 / inner_h), _grey([70, 25, 30], skin))


def _hair_glasses_occluders(canvas, ident, view, hair):
    """Hair above the hairline, glasses (rings, tinted lenses, bridge), then up to two occluders."""
    fa, fb, cy = ident["face_a"], ident["face_b"], ident["face_cy"]
    top = canvas.part(_xy(56, cy), _xy(fa * 1.06, fb * 1.05), DEPTH["hair_top"], present=ident["hair_top"])
    line = (_col(top.pick(ident["hairline"])) + _col(top.pick(ident["hairline_slope"])) * top.u
            + _col(top.pick(ident["hairline_k"])) * (top.u - _col(top.pick(ident["hairline_part"]))) ** 2)
    canvas.paint(top, top.ellipse() * (1 - top.below(line)), hair)

    worn = ident["glasses"] * view["glasses_on"]
    for side in (-1, 1):
        centre = _xy(56 + side * ident["eye_dx"], ident["eye_y"])
        outer = canvas.part(centre, _xy(ident["eye_w"] + 4.5, ident["eye_h"] + 5), DEPTH["glasses"], present=worn)
        inner = canvas.part(centre, _xy(ident["eye_w"] + 3, ident["eye_h"] + 3.5), DEPTH["glasses"],
                            window=outer.window, present=worn)
        ring, lens = outer.ellipse(), inner.ellipse()
        canvas.paint(outer, ring * (1 - lens), ident["glasses_colour"])
        canvas.paint(outer, lens * 0.15, ident["glasses_colour"])
    bridge = canvas.part(_xy(56, ident["eye_y"] - 1), _xy(ident["eye_dx"] - ident["eye_w"] - 4, np.full_like(fa, 0.8)),
                         DEPTH["glasses"], present=worn)
    canvas.paint(bridge, bridge.rect(), ident["glasses_colour"])

    for i in range(2):
        occluder = canvas.part(view["occluder_centre"][:, i], view["occluder_size"][:, i], DEPTH["occluder"],
                               angle=view["occluder_angle"][:, i], present=view["occluder"][:, i])
        canvas.paint(occluder, occluder.rect(), view["occluder_colour"][:, i])


def _finish(canvas, view, rng):
    """Lighting, colour cast, contrast, grey photos, sensor noise → B×H×W×3 uint8."""
    h, w = canvas.height, canvas.width
    reach = 0.5 * max(h, w)
    cos, sin = np.cos(view["light_angle"]), np.sin(view["light_angle"])
    grad = view["light_grad"] * view["light_gain"]
    light = (_col(view["light_gain"]) + _col(grad * cos / reach) * (canvas.full.x - w / 2)
             + _col(grad * sin / reach) * (canvas.full.y - h / 2))
    gain = view["cast"] * view["contrast"][:, None]
    img = canvas.img * np.maximum(light, 0.1)[:, None] * gain[:, :, None, None]
    img += (128 * (1 - view["contrast"]))[:, None, None, None]
    grey = view["grey"] > 0
    if grey.any():
        lum = np.einsum("bchw,c->bhw", img[grey], np.array([0.299, 0.587, 0.114], _F))
        img[grey] = lum[:, None]
    img += rng.standard_normal(img.shape, dtype=_F) * view["noise"][:, None, None, None]
    return np.clip(img + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def render(ident, view, transform, height, width, rng):
    """Images (B×H×W×3 uint8 RGB) of faces ``ident`` seen as ``view``, placed by ``transform``.

    ``transform`` (B×2×3) maps posed face coordinates to image pixels; ``rng`` draws the noise.
    """
    canvas = _Canvas(view, np.asarray(transform, _F), int(height), int(width))
    _background(canvas, view)
    skin, hair = _head(canvas, ident, view)
    _eyes_and_brows(canvas, ident, view, skin)
    _nose_and_mouth(canvas, ident, view, skin)
    _hair_glasses_occluders(canvas, ident, view, hair)
    return _finish(canvas, view, rng)


# ---------------------------------------------------------------------------------------------
# the two kinds of photo
# ---------------------------------------------------------------------------------------------
def aligned_transforms(ident, view, rng, detector_noise=0.8):
    """Maps that align each face to the template as a face pipeline would (B×2×3).

    The posed landmarks, seen through a detector with ``detector_noise`` px of error, are aligned to
    :data:`TEMPLATE` by a similarity, then a small residual jitter (rotation, scale, shift) is added.
    """
    n = len(view["yaw"])
    detected = posed_landmarks(ident, view) + rng.normal(0, detector_noise, (n, 5, 2)).astype(_F)
    align = similarity_transform(detected, TEMPLATE)
    jitter = similarity(rng.normal(0, 0.05, n), 1 + rng.normal(0, 0.03, n), rng.normal(0, 1.2, (n, 2)),
                        [56.0, 56.0])
    return compose(jitter, align)


def render_aligned(ident, view, rng, size=112):
    """Aligned face crops as in MS1M (B×size×size×3 uint8) and their true landmarks (B×5×2)."""
    transform = aligned_transforms(ident, view, rng)
    if size != 112:
        transform = compose(similarity(np.zeros(len(transform)), np.full(len(transform), size / 112.0),
                                       np.zeros((len(transform), 2)), [0.0, 0.0]), transform)
    images = render(ident, view, transform, size, size, rng)
    return images, apply_transform(transform, posed_landmarks(ident, view))


def loose_layout(view, rng, min_size=150, max_size=250):
    """Unaligned photo layouts: sizes (B×2 int: width, height) and maps (B×2×3).

    The face is rotated (σ 12°, at most 35°), scaled with the photo and placed near its centre.
    """
    n = len(view["yaw"])
    sizes = rng.integers(min_size, max_size + 1, (n, 2))
    scale = rng.uniform(0.75, 1.15, n) * sizes.min(1) / 150.0
    angle = np.clip(rng.normal(0, 0.21, n), -0.61, 0.61)
    target = sizes / 2 + rng.uniform(-0.08, 0.08, (n, 2)) * sizes
    transform = similarity(angle, scale, target - FACE_CENTRE, FACE_CENTRE)
    return sizes, transform


def render_loose(ident, view, sizes, transform, rng, batch=32):
    """Unaligned photos of varying sizes (list of H×W×3 uint8) and their true landmarks (B×5×2).

    Photos are rendered in batches of similar size, each on the batch's largest grid, then cropped.
    """
    order = np.lexsort((sizes[:, 0], sizes[:, 1]))
    images = [None] * len(order)
    for start in range(0, len(order), batch):
        index = order[start:start + batch]
        width, height = sizes[index].max(0)
        part = render(take(ident, index), take(view, index), transform[index], height, width, rng)
        for i, image in zip(index.tolist(), part):
            images[i] = image[:sizes[i, 1], :sizes[i, 0]]
    return images, apply_transform(transform, posed_landmarks(ident, view))
