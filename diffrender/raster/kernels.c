#ifndef DR_TYPED
/* Compiled kernels of the soft rasterizer: pair search, the fused sweeps (forward, J, Jᵀ) and a silhouette's J
   kept as per-pair coefficients (dr_coef) with its products.

   Plain C99 without Python or torch headers, so any C compiler builds it in about a second; it is loaded
   with ctypes (raster/native.py), which also splits the work over threads by ranges of bands. Nothing
   here allocates result memory.

   Pairs are stored as runs: (view_face, first pixel, length), the consecutive pixels of one image row
   that lie within the cutoff of one face. The image is cut into bands of band_rows rows; a band's runs
   are contiguous, ordered by face, then row. Per-(view, face) table rows (raster/geometry.py, 19 values):
   edge k is opposite vertex k, starts at s_k = v_{k+1}, has direction e_k = v_{k+2} - v_{k+1};
   E_k(p) = cross(e_k, p - s_k) = 2·area·l_k (l_k the screen barycentric of vertex k); il_k = 1/|e_k|²;
   z_k the depth of vertex k; ia = 1/(2·area). The math follows raster/soft.py, the PyTorch reference. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 19
/* min/max as selects (libm's fmin/fmax are calls with NaN rules we do not need) */
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define BLK 64 /* pixels of a run processed at once (stack buffers) */
enum { SX = 0, SY = 3, EX = 6, EY = 9, IL = 12, Z = 15, IA = 18 };

/* Everything a sweep needs; data pointers are float or double depending on the function suffix. */
typedef struct {
    const void *xy, *z;       /* (N, V, 2) pixel coordinates and (N, V) depths of the vertices */
    const void *attrs;        /* (V, C) per-vertex attributes blended after the depth (C may be 0) */
    const int64_t *faces;     /* (F, 3) */
    const int64_t *runs;      /* (R, 3): view_face, first pixel (flat over N*H*W), length */
    const int64_t *band_off;  /* (NB + 1): runs of band b are band_off[b] .. band_off[b+1] - 1 */
    int64_t NP, V, F, H, W, C, blend, band_rows, cull; /* NP = N*H*W; cull: skip faces not front-facing now */
    double scale;             /* ndc_per_px² / σ: coverage logit x = ±scale · d²(px) */
    double r2;                /* squared cutoff radius (px²): farther pairs contribute exactly nothing */
    double kz;                /* 1 / ((far - near) γ): log-weight = log sigmoid(x) - depth · kz (+ const) */
    void *alpha;              /* (N*H*W) */
    void *out;                /* (N*H*W, 1 + C): blended depth, then attributes */
    void *state;              /* (3, N*H*W): Σ log(1 - D), max log-weight, Σ weights (relative to the max) */
    const void *t_xy, *t_z, *t_attrs; /* J: tangents in */
    void *t_alpha, *t_out;            /*    tangents out */
    const void *g_alpha, *g_out;      /* Jᵀ: cotangents in */
    void *g_xy, *g_z, *g_attrs;       /*     accumulated into (a thread-private buffer each) */
    const int64_t *pair_off;          /* (NB + 1): pairs before band b (dr_coef's rows) */
    void *c_coef;                     /* dr_coef: (P, 4) coefficients out */
    int32_t *c_idx;                   /*          (P, 3) pixel, vertex a, vertex b out */
} Params;

/* The row intervals of pixels whose centers lie within radius R of a triangle (or inside it): the
   union of the triangle and the capsules of its edges (segment ⊕ disc) is convex, so each row meets it
   in one interval, the hull of the rows' intervals of the pieces. Everything that does not depend on
   the row is set up once per face. Directions parallel to an axis are nudged off it by 1e-12 instead of
   being special-cased, which only changes slices exactly on a piece's boundary: there the endpoint
   discs cover the rectangles, and pixels exactly at distance R (the cutoff plus the search slack) are
   beyond the cutoff anyway. */
typedef struct {
    double sx[3], sy[3], ex[3], L[3], ux[3], uy[3], iux[3], iuy[3], A0[3], iB[3];
    double lo_off[3], hi_off[3]; /* 0 where edge k bounds the triangle's slice from below (above), else ∓inf */
    double R, R2, sgn;
} Reach;

static double nudge(double v) { return fabs(v) > 1e-12 ? v : (v < 0 ? -1e-12 : 1e-12); }

static void reach_setup(const double *tr, double R, Reach *g) {
    g->R = R;
    g->R2 = R * R;
    g->sgn = tr[IA] > 0 ? 1.0 : -1.0;
    for (int k = 0; k < 3; k++) {
        double sx = tr[SX + k], sy = tr[SY + k], ex = tr[EX + k], ey = tr[EY + k], L = sqrt(ex * ex + ey * ey);
        g->sx[k] = sx, g->sy[k] = sy, g->ex[k] = ex, g->L[k] = L;
        g->ux[k] = L > 0 ? ex / L : 0, g->uy[k] = L > 0 ? ey / L : 0;
        g->iux[k] = 1 / nudge(g->ux[k]), g->iuy[k] = 1 / nudge(g->uy[k]);
        /* triangle: sgn·E_k = A0 + sgn·ex·dy - sgn·ey·x >= 0, A0 = sgn·ey·sx */
        g->A0[k] = g->sgn * ey * sx;
        g->iB[k] = 1 / nudge(-g->sgn * ey);
        g->lo_off[k] = g->iB[k] > 0 ? 0 : -INFINITY, g->hi_off[k] = g->iB[k] < 0 ? 0 : INFINITY;
    }
}

/* The x-interval [xl[i], xr[i]] of the region on the rows y0 + i (i < cnt): xl > xr when a row misses it.
   Branch-free, so that the loop over rows vectorizes. */
static __attribute__((noinline)) void reach_rows(const Reach *restrict g, double y0, int cnt, double *restrict xl,
                                                 double *restrict xr) {
    Reach c = *g; /* local copy: invariant loads the vectorizer can hoist */
#pragma omp simd
    for (int i = 0; i < cnt; i++) {
        double y = y0 + i, lo_ = INFINITY, hi_ = -INFINITY, tl = -INFINITY, th = INFINITY;
#pragma GCC unroll 3
        for (int k = 0; k < 3; k++) {
            double dy = y - c.sy[k], h2 = c.R2 - dy * dy, h = sqrt(h2 > 0 ? h2 : 0);
            lo_ = MIN(lo_, h2 >= 0 ? c.sx[k] - h : INFINITY); /* disc around vertex s_k */
            hi_ = MAX(hi_, h2 >= 0 ? c.sx[k] + h : -INFINITY);
            /* rectangle {s + u·e/L + v·n: 0 <= u <= L, |v| <= R}, n = (-uy, ux) */
            double cu = dy * c.uy[k], p = -cu * c.iux[k], q = (c.L[k] - cu) * c.iux[k];
            double cv = dy * c.ux[k], p2 = (cv - c.R) * c.iuy[k], q2 = (cv + c.R) * c.iuy[k];
            double lo = MAX(MIN(p, q), MIN(p2, q2)), hi = MIN(MAX(p, q), MAX(p2, q2));
            lo_ = MIN(lo_, lo <= hi ? c.sx[k] + lo : INFINITY);
            hi_ = MAX(hi_, lo <= hi ? c.sx[k] + hi : -INFINITY);
            /* triangle: A + B·x >= 0 with B = -sgn·ey: x >= -A/B for B > 0, x <= -A/B for B < 0 */
            double t = -(c.A0[k] + c.sgn * c.ex[k] * dy) * c.iB[k];
            tl = MAX(tl, t + c.lo_off[k]); /* offsets, not selects: a select on a loop-invariant flag */
            th = MIN(th, t + c.hi_off[k]); /* keeps gcc from vectorizing */
        }
        xl[i] = MIN(lo_, tl <= th ? tl : INFINITY);
        xr[i] = MAX(hi_, tl <= th ? th : -INFINITY);
    }
}

/* Pixel columns [a, b] of an interval, clamped to [c0, c1]; generous by a relative 1e-9 so that rounding
   never drops a pixel (the sweeps test each pair's exact distance). Returns 0 when empty. */
static inline int columns(double xl, double xr, int64_t c0, int64_t c1, int64_t *a, int64_t *b) {
    if (!(xl <= xr)) return 0;
    double tol = 1e-9 * (1 + fabs(xl) + fabs(xr)), lo = ceil(xl - 0.5 - tol), hi = floor(xr - 0.5 + tol);
    lo = lo > (double)c0 ? lo : (double)c0;
    hi = hi < (double)c1 ? hi : (double)c1;
    if (!(lo <= hi)) return 0;
    *a = (int64_t)lo;
    *b = (int64_t)hi;
    return 1;
}

/* A search plan: the valid view-faces (their rows in double, grown boxes) binned into bands of band_rows
   image rows (nb bands per view). */
typedef struct {
    int64_t F, H, W, band_rows, nb, nbands, nvalid;
    double R;
    double *rows;        /* (nvalid, 19) */
    int64_t *vf, *box;   /* (nvalid,) view-face, (nvalid, 4) c0, r0, c1, r1 */
    int64_t *band_off;   /* (nbands + 1) into items */
    int64_t *items;      /* plan indices, ascending within each band */
    int64_t *ub_off;     /* (nbands + 1): at most one run per (face, row) */
} Plan;

void dr_plan_free(void *plan) {
    Plan *P = plan;
    if (!P) return;
    free(P->rows), free(P->vf), free(P->box), free(P->band_off), free(P->items), free(P->ub_off), free(P);
}

/* Bins the plan's faces into the bands their boxes overlap; returns 0 if memory ran out. */
static int plan_bins(Plan *P) {
    int64_t NB = P->nbands, BR = P->band_rows;
    P->band_off = calloc((size_t)NB + 1, sizeof(int64_t));
    P->ub_off = calloc((size_t)NB + 1, sizeof(int64_t));
    int64_t *cursor = malloc(((size_t)NB + 1) * sizeof(int64_t));
    if (!P->band_off || !P->ub_off || !cursor) return free(cursor), 0;
    for (int64_t i = 0; i < P->nvalid; i++) {
        const int64_t *bx = P->box + 4 * i;
        int64_t base = (P->vf[i] / P->F) * P->nb;
        for (int64_t bb = bx[1] / BR; bb <= bx[3] / BR; bb++) {
            int64_t lo = bx[1] > bb * BR ? bx[1] : bb * BR, hi = bx[3] < bb * BR + BR - 1 ? bx[3] : bb * BR + BR - 1;
            P->band_off[base + bb + 1]++;
            P->ub_off[base + bb + 1] += hi - lo + 1;
        }
    }
    for (int64_t b = 0; b < NB; b++) P->band_off[b + 1] += P->band_off[b], P->ub_off[b + 1] += P->ub_off[b];
    P->items = malloc(((size_t)P->band_off[NB] + 1) * sizeof(int64_t));
    if (!P->items) return free(cursor), 0;
    memcpy(cursor, P->band_off, (size_t)NB * sizeof(int64_t));
    for (int64_t i = 0; i < P->nvalid; i++) {
        const int64_t *bx = P->box + 4 * i;
        int64_t base = (P->vf[i] / P->F) * P->nb;
        for (int64_t bb = bx[1] / BR; bb <= bx[3] / BR; bb++) P->items[cursor[base + bb]++] = i;
    }
    free(cursor);
    return 1;
}

/* Pair search over bands [b_lo, b_hi) of a plan: for each face of a band and each of its rows there, the
   interval of pixels within R of the triangle is one run (view_face, first pixel, length), written from
   the band's upper-bound slot on; band_count[b] gets the band's runs, band_pairs[b] its pairs. */
void dr_search(const void *plan, int64_t b_lo, int64_t b_hi, int64_t *ub_runs, int64_t *band_count,
               int64_t *band_pairs) {
    const Plan *P = plan;
    int64_t BR = P->band_rows, H = P->H, W = P->W;
    double xl[64], xr[64];
    for (int64_t b = b_lo; b < b_hi; b++) {
        int64_t n = b / P->nb, rlo = (b % P->nb) * BR, rhi = rlo + BR < H ? rlo + BR : H;
        int64_t m = 0, pairs = 0, *out = ub_runs + 3 * P->ub_off[b];
        for (int64_t j = P->band_off[b]; j < P->band_off[b + 1]; j++) {
            int64_t i = P->items[j], vf = P->vf[i];
            const int64_t *bx = P->box + 4 * i;
            int64_t ya = bx[1] > rlo ? bx[1] : rlo, yb = bx[3] < rhi - 1 ? bx[3] : rhi - 1;
            Reach g;
            reach_setup(P->rows + ROWS * i, P->R, &g);
            for (int64_t y0 = ya; y0 <= yb; y0 += 64) {
                int cnt = (int)(yb - y0 + 1 < 64 ? yb - y0 + 1 : 64);
                reach_rows(&g, (double)y0 + 0.5, cnt, xl, xr);
                for (int r = 0; r < cnt; r++) {
                    int64_t a, c;
                    if (!columns(xl[r], xr[r], bx[0], bx[2], &a, &c)) continue;
                    out[3 * m] = vf;
                    out[3 * m + 1] = (n * H + y0 + r) * W + a;
                    out[3 * m + 2] = c - a + 1;
                    pairs += c - a + 1;
                    m++;
                }
            }
        }
        band_count[b] = m;
        band_pairs[b] = pairs;
    }
}

/* mask (N*H*W) <- 1 for every pixel of the runs (R, 3). */
void dr_cover(const int64_t *runs, int64_t R, uint8_t *mask) {
    for (int64_t r = 0; r < R; r++) memset(mask + runs[3 * r + 1], 1, (size_t)runs[3 * r + 2]);
}

/* Moves the runs of bands [b_lo, b_hi) from their upper-bound slots to run_base[b] on. */
void dr_compact(const void *plan, const int64_t *run_base, const int64_t *band_count, int64_t b_lo, int64_t b_hi,
                const int64_t *ub_runs, int64_t *runs) {
    const Plan *P = plan;
    for (int64_t b = b_lo; b < b_hi; b++)
        memcpy(runs + 3 * run_base[b], ub_runs + 3 * P->ub_off[b], (size_t)band_count[b] * 3 * sizeof(int64_t));
}

/* The plan's upper-bound offsets (nbands + 1), for splitting the search over threads. */
void dr_plan_ub(const void *plan, int64_t *out) {
    const Plan *P = plan;
    memcpy(out, P->ub_off, (size_t)(P->nbands + 1) * sizeof(int64_t));
}

/* The typed kernels: this file includes itself once per storage type. */
#define DR_TYPED
#define T float
#define FN(name) name##_f32
#define FAST_MATH 1
#include __FILE__
#undef T
#undef FN
#undef FAST_MATH
#define T double
#define FN(name) name##_f64
#define FAST_MATH 0
#include __FILE__

#else /* ------------------------------------------------------------------ typed part: T, FN(name) */

/* exp(x) for x <= 0 (0 below the float range; -inf gives 0) and log1p(e) for e in [0, 1]. In float they are
   branch-free polynomials (Cephes' expf; 2·atanh(e / (2 + e)) as a series), so that loops vectorize; in
   double, libm. */
#if FAST_MATH
static inline float FN(exp_neg)(float x) {
    float xc = x > -87.0f ? x : -87.0f;
    float k = rintf(xc * 1.44269504089f);
    float r = xc - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } u;
    u.i = ((int32_t)k + 127) << 23;
    return x > -87.0f ? p * u.f : 0.0f;
}
static inline float FN(log1p_01)(float e) {
    float s = e / (2.0f + e), s2 = s * s;
    float p = 1.0f / 13;
    p = p * s2 + 1.0f / 11;
    p = p * s2 + 1.0f / 9;
    p = p * s2 + 1.0f / 7;
    p = p * s2 + 1.0f / 5;
    p = p * s2 + 1.0f / 3;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}
#else
static inline double FN(exp_neg)(double x) { return exp(x); }
static inline double FN(log1p_01)(double e) { return log1p(e); }
#endif

/* Per-pair geometry of a run's pixel i at (px, py): coverage logit and what its derivatives need. */
typedef struct {
    T dx[3], dy[3], E[3];
    T rx, ry, t, sg, x, keep;
    int k;
} FN(Dist);

static inline void FN(distance)(const T *f, T px, T py, T scale, T r2, FN(Dist) *d) {
    T d2[3], rx[3], ry[3], tt[3];
    for (int k = 0; k < 3; k++) {
        T dx = px - f[SX + k], dy = py - f[SY + k], ex = f[EX + k], ey = f[EY + k];
        T t = (ex * dx + ey * dy) * f[IL + k];
        t = t > 0 ? t : 0;
        t = t < 1 ? t : 1;
        d->dx[k] = dx;
        d->dy[k] = dy;
        d->E[k] = ex * dy - ey * dx;
        tt[k] = t;
        rx[k] = dx - t * ex;
        ry[k] = dy - t * ey;
        d2[k] = rx[k] * rx[k] + ry[k] * ry[k];
    }
    T ia = f[IA];
    int inside = (d->E[0] * ia >= 0) & (d->E[1] * ia >= 0) & (d->E[2] * ia >= 0);
    T d01 = d2[1] < d2[0] ? d2[1] : d2[0];
    int k = d2[2] < d01 ? 2 : (d2[1] < d2[0] ? 1 : 0);
    T dm = k == 2 ? d2[2] : d01;
    d->k = k;
    d->rx = k == 0 ? rx[0] : (k == 1 ? rx[1] : rx[2]);
    d->ry = k == 0 ? ry[0] : (k == 1 ? ry[1] : ry[2]);
    d->t = k == 0 ? tt[0] : (k == 1 ? tt[1] : tt[2]);
    d->sg = inside ? scale : -scale;
    d->x = d->sg * dm;
    d->keep = (inside | (dm <= r2)) ? 1 : 0;
}

/* Perspective-correct barycentrics: l_k = max(E_k·ia, 0), u_k = l_k / z_k, λ_k = u_k / Σu, depth = Σl / Σu
   (raster/soft.py normalizes l first; the result is the same). */
typedef struct {
    T l[3], u[3], lam[3], S, U, depth;
    int pos[3];
} FN(Bary);

static inline void FN(bary)(const T *f, const FN(Dist) *d, FN(Bary) *b) {
    b->S = b->U = 0;
    for (int k = 0; k < 3; k++) {
        T v = d->E[k] * f[IA];
        b->pos[k] = v >= 0;
        b->l[k] = b->pos[k] ? v : 0;
        b->S += b->l[k];
        b->u[k] = b->l[k] / f[Z + k];
        b->U += b->u[k];
    }
    for (int k = 0; k < 3; k++) b->lam[k] = b->u[k] / b->U;
    b->depth = b->S / b->U;
}

/* The table row of view-face (n, f) from the vertices, exactly as raster/geometry.py's face_rows: edge
   starts s_k = v_{k+1}, edges e_k = v_{k+2} - v_{k+1}, il_k = 1/|e_k|², depths, ia = 1/(2·area) (1 for
   degenerate edges and faces, which the search drops). tiny = sqrt(smallest normal number). */
#define TINY (sizeof(T) == 4 ? (T)1.0842022e-19 : (T)1.4916681462400413e-154)
static inline int FN(real_area)(const T *f) { /* whether ia is 1/(2·area), not the stand-in 1 */
    T area2 = f[EX + 1] * f[EY + 2] - f[EY + 1] * f[EX + 2];
    return (area2 > 0 ? area2 : -area2) > TINY;
}

static inline void FN(face_row)(const T *xy, const T *z, const int64_t *fv, int64_t n, int64_t V, T *f) {
    const T tiny = TINY;
    const T *v[3] = {xy + 2 * (n * V + fv[0]), xy + 2 * (n * V + fv[1]), xy + 2 * (n * V + fv[2])};
    for (int k = 0; k < 3; k++) {
        const T *s = v[(k + 1) % 3], *e = v[(k + 2) % 3];
        f[SX + k] = s[0], f[SY + k] = s[1], f[EX + k] = e[0] - s[0], f[EY + k] = e[1] - s[1];
        T len2 = f[EX + k] * f[EX + k] + f[EY + k] * f[EY + k];
        f[IL + k] = 1 / (len2 > tiny ? len2 : 1);
        f[Z + k] = z[n * V + fv[k]];
    }
    T area2 = f[EX + 1] * f[EY + 2] - f[EY + 1] * f[EX + 2];
    f[IA] = 1 / ((area2 > 0 ? area2 : -area2) > tiny ? area2 : 1);
}

/* Its tangent from vertex tangents (t_xy, t_z), given the row f itself; il carries no derivative (see
   raster/geometry.py's distance2). */
static inline void FN(face_row_tangent)(const T *t_xy, const T *t_z, const int64_t *fv, int64_t n, int64_t V,
                                        const T *f, T *dt) {
    const T *v[3] = {t_xy + 2 * (n * V + fv[0]), t_xy + 2 * (n * V + fv[1]), t_xy + 2 * (n * V + fv[2])};
    for (int k = 0; k < 3; k++) {
        const T *s = v[(k + 1) % 3], *e = v[(k + 2) % 3];
        dt[SX + k] = s[0], dt[SY + k] = s[1], dt[EX + k] = e[0] - s[0], dt[EY + k] = e[1] - s[1], dt[IL + k] = 0;
        dt[Z + k] = t_z[n * V + fv[k]];
    }
    T darea2 = dt[EX + 1] * f[EY + 2] + f[EX + 1] * dt[EY + 2] - dt[EY + 1] * f[EX + 2] - f[EY + 1] * dt[EX + 2];
    dt[IA] = FN(real_area)(f) ? -f[IA] * f[IA] * darea2 : 0;
}

/* The transpose: adds the cotangent g of a table row to the vertices (g_xy, g_z). */
static inline void FN(face_row_adjoint)(const T *g, const int64_t *fv, int64_t n, int64_t V, const T *f, T *g_xy,
                                        T *g_z) {
    T ge[3][2];
    for (int k = 0; k < 3; k++) ge[k][0] = g[EX + k], ge[k][1] = g[EY + k];
    if (FN(real_area)(f)) {
        T ga = -f[IA] * f[IA] * g[IA];
        ge[1][0] += ga * f[EY + 2], ge[2][1] += ga * f[EX + 1], ge[1][1] -= ga * f[EX + 2], ge[2][0] -= ga * f[EY + 1];
    }
    for (int k = 0; k < 3; k++) {
        T *s = g_xy + 2 * (n * V + fv[(k + 1) % 3]), *e = g_xy + 2 * (n * V + fv[(k + 2) % 3]);
        s[0] += g[SX + k] - ge[k][0], s[1] += g[SY + k] - ge[k][1];
        e[0] += ge[k][0], e[1] += ge[k][1];
        g_z[n * V + fv[k]] += g[Z + k];
    }
}

/* Whether view-face (n, f) can have pairs (raster/coverage.py's valid_faces): all three vertices in front
   of the near plane, a finite non-degenerate screen area, and front-facing (negative area) when culling. */
static inline int FN(face_valid)(const T *z, const int64_t *fv, int64_t n, int64_t V, const T *f, double near,
                                 int64_t cull) {
    T area2 = f[EX + 1] * f[EY + 2] - f[EY + 1] * f[EX + 2];
    int in_front = z[n * V + fv[0]] > near && z[n * V + fv[1]] > near && z[n * V + fv[2]] > near;
    return in_front && isfinite(area2) && (area2 > 0 ? area2 : -area2) > TINY && (!cull || area2 < 0);
}

/* valid (N*F) <- face_valid of every view-face. */
void FN(dr_valid)(const T *xy, const T *z, const int64_t *faces, int64_t N, int64_t V, int64_t F, double near,
                  int64_t cull, uint8_t *valid) {
    T f[ROWS];
    for (int64_t n = 0; n < N; n++)
        for (int64_t i = 0; i < F; i++) {
            FN(face_row)(xy, z, faces + 3 * i, n, V, f);
            valid[n * F + i] = (uint8_t)FN(face_valid)(z, faces + 3 * i, n, V, f, near, cull);
        }
}

/* The search plan for N views of the vertices xy (N, V, 2), z (N, V): the valid view-faces whose box,
   grown by R and clamped to the image, is not empty, binned into bands. sizes <- (upper bound on runs,
   number of bands). NULL if memory ran out. */
void *FN(dr_plan)(const T *xy, const T *z, const int64_t *faces, int64_t N, int64_t V, int64_t F, int64_t H,
                  int64_t W, double near, int64_t cull, double R, int64_t band_rows, int64_t *sizes) {
    Plan *P = calloc(1, sizeof(Plan));
    if (!P) return NULL;
    P->F = F, P->H = H, P->W = W, P->band_rows = band_rows, P->nb = (H + band_rows - 1) / band_rows;
    P->nbands = N * P->nb, P->R = R;
    P->rows = malloc((size_t)(N * F) * ROWS * sizeof(double) + 1);
    P->vf = malloc((size_t)(N * F) * sizeof(int64_t) + 1);
    P->box = malloc((size_t)(N * F) * 4 * sizeof(int64_t) + 1);
    if (!P->rows || !P->vf || !P->box) return dr_plan_free(P), NULL;
    T f[ROWS];
    for (int64_t n = 0; n < N; n++)
        for (int64_t i = 0; i < F; i++) {
            const int64_t *fv = faces + 3 * i;
            FN(face_row)(xy, z, fv, n, V, f);
            if (!FN(face_valid)(z, fv, n, V, f, near, cull)) continue;
            double x0 = f[SX], x1 = f[SX], y0 = f[SY], y1 = f[SY]; /* the edge starts are the three vertices */
            for (int k = 1; k < 3; k++) {
                x0 = MIN(x0, (double)f[SX + k]), x1 = MAX(x1, (double)f[SX + k]);
                y0 = MIN(y0, (double)f[SY + k]), y1 = MAX(y1, (double)f[SY + k]);
            }
            /* pixel column j has its center at j + 0.5: columns within [xmin - R, xmax + R] */
            double c0 = MAX(ceil(x0 - R - 0.5), 0), c1 = MIN(floor(x1 + R - 0.5), (double)(W - 1));
            double r0 = MAX(ceil(y0 - R - 0.5), 0), r1 = MIN(floor(y1 + R - 0.5), (double)(H - 1));
            if (!(c0 <= c1 && r0 <= r1)) continue;
            int64_t m = P->nvalid++;
            for (int k = 0; k < ROWS; k++) P->rows[ROWS * m + k] = (double)f[k];
            P->vf[m] = n * F + i;
            P->box[4 * m] = (int64_t)c0, P->box[4 * m + 1] = (int64_t)r0;
            P->box[4 * m + 2] = (int64_t)c1, P->box[4 * m + 3] = (int64_t)r1;
        }
    if (!plan_bins(P)) return dr_plan_free(P), NULL;
    sizes[0] = P->ub_off[P->nbands], sizes[1] = P->nbands;
    return P;
}

/* Bands: band b holds rows [rlo, rhi) of view n; its pixels are base .. base + bpx - 1. */
#define BAND_GEOMETRY(p, b)                                                                         \
    int64_t nb_ = ((p)->H + (p)->band_rows - 1) / (p)->band_rows, n = (b) / nb_;                \
    int64_t rlo = ((b) % nb_) * (p)->band_rows;                                                    \
    int64_t rhi = rlo + (p)->band_rows < (p)->H ? rlo + (p)->band_rows : (p)->H;                   \
    int64_t base = n * (p)->H * (p)->W + rlo * (p)->W, bpx = (rhi - rlo) * (p)->W

/* Up to BLK pixels of consecutive runs of one face (a band's runs are grouped by face), so that the
   vector loops see full blocks however short the runs: pixel centers and band-local pixel indices. */
typedef struct {
    T px[BLK], py[BLK];
    int32_t lp[BLK];
    int n;
    int64_t vf;
} FN(Block);

/* Fills blk from run *r, pixel *off on (advancing both), stopping at BLK pixels, at a new face or at
   run r_end. Returns 0 when there is nothing left. */
static inline int FN(next_block)(const Params *p, int64_t r_end, int64_t base, int64_t *r, int64_t *off,
                                 FN(Block) *blk) {
    blk->n = 0;
    if (*r >= r_end) return 0;
    blk->vf = p->runs[3 * *r];
    while (*r < r_end && p->runs[3 * *r] == blk->vf && blk->n < BLK) {
        const int64_t *run = p->runs + 3 * *r;
        int64_t lp0 = run[1] - base, take = run[2] - *off;
        if (take > BLK - blk->n) take = BLK - blk->n;
        T py = (T)(lp0 / p->W) + (T)0.5, px0 = (T)(lp0 % p->W + *off) + (T)0.5;
        for (int64_t i = 0; i < take; i++) {
            blk->px[blk->n] = px0 + (T)i;
            blk->py[blk->n] = py; /* band-local row: the rows above the band do not matter, see BAND_ROW0 */
            blk->lp[blk->n++] = (int32_t)(lp0 + *off + i);
        }
        *off += take;
        if (*off == run[2]) *off = 0, (*r)++;
    }
    return 1;
}

/* Per-block face: its vertex indices fv and table row f, with the band's first row folded into the y
   coordinates (pixel centers stay band-local and small). Under culling, a face that is not front-facing
   at this geometry contributes nothing (a reused pair list may hold faces that have turned away). */
#define BLOCK_FACE(p, blk, f)                                                                       \
    const int64_t *fv = (p)->faces + 3 * ((blk).vf - n * (p)->F);                                   \
    FN(face_row)((p)->xy, (p)->z, fv, n, (p)->V, f);                                                \
    if ((p)->cull && !(f[EX + 1] * f[EY + 2] - f[EY + 1] * f[EX + 2] < 0)) continue;                \
    for (int k_ = 0; k_ < 3; k_++) f[SY + k_] -= (T)rlo

/* The per-block vector loops, each in a function of its own over restrict-qualified block arrays, which
   is what lets the compiler vectorize them: f is the face's table row, px/py the block's pixel centers. */
#define KERNEL static __attribute__((noinline)) void
#define R_ * restrict

static inline T FN(sigmoid)(T x, T e) { return x >= 0 ? 1 / (1 + e) : e / (1 + e); } /* e = exp(-|x|) */

/* The tangent of one pair's coverage logit: Danskin's theorem, d(d²) = -2 r·(ds_k + t de_k) with the
   nearest edge k and its projection parameter t held fixed. The tangent row is passed as scalars, so
   that picking edge k is a select, not a (masked) load. */
typedef struct {
    T sx[3], sy[3], ex[3], ey[3];
} FN(Tangent);

static inline FN(Tangent) FN(tangent_row)(const T *dt) { /* the edge part of a table row's tangent */
    FN(Tangent) g;
    for (int k = 0; k < 3; k++) g.sx[k] = dt[SX + k], g.sy[k] = dt[SY + k], g.ex[k] = dt[EX + k], g.ey[k] = dt[EY + k];
    return g;
}

/* r·(ds_k + t de_k) for nearest edge k, offset r = (rx, ry) and projection parameter t */
static inline T FN(edge_move)(int k, T rx, T ry, T t, FN(Tangent) g) {
    T tsx = k == 0 ? g.sx[0] : (k == 1 ? g.sx[1] : g.sx[2]);
    T tsy = k == 0 ? g.sy[0] : (k == 1 ? g.sy[1] : g.sy[2]);
    T tex = k == 0 ? g.ex[0] : (k == 1 ? g.ex[1] : g.ex[2]);
    T tey = k == 0 ? g.ey[0] : (k == 1 ? g.ey[1] : g.ey[2]);
    return rx * (tsx + t * tex) + ry * (tsy + t * tey);
}

static inline T FN(dlogit)(const FN(Dist) *d, FN(Tangent) g) {
    return d->sg * -2 * FN(edge_move)(d->k, d->rx, d->ry, d->t, g);
}

/* forward: sp = log(1 - D) = -softplus(x) of each pixel (0 beyond the cutoff) */
KERNEL FN(k_cover)(const T R_ f_, const T R_ px, const T R_ py, int cnt, T scale, T r2, T R_ sp) {
    T f[ROWS];
    for (int k = 0; k < ROWS; k++) f[k] = f_[k]; /* local copies: invariant loads the vectorizer can hoist */
#pragma omp simd
    for (int i = 0; i < cnt; i++) {
        FN(Dist) d;
        FN(distance)(f, px[i], py[i], scale, r2, &d);
        T ax = d.x > 0 ? d.x : -d.x, L = FN(log1p_01)(FN(exp_neg)(-ax));
        sp[i] = -d.keep * ((d.x > 0 ? d.x : 0) + L);
    }
}

/* forward with blending: also the new running maxima tn, the factors wa (old sums) and wb (this pair) of
   the online softmax, depth and perspective-correct barycentrics */
KERNEL FN(k_cover_blend)(const T R_ f_, const T R_ px, const T R_ py, int cnt, T scale, T r2, T kz, const T R_ tg,
                         T R_ sp, T R_ tn, T R_ wa, T R_ wb, T R_ dep, T R_ l0, T R_ l1, T R_ l2) {
    T f[ROWS];
    for (int k = 0; k < ROWS; k++) f[k] = f_[k]; /* local copies: invariant loads the vectorizer can hoist */
#pragma omp simd
    for (int i = 0; i < cnt; i++) {
        FN(Dist) d;
        FN(distance)(f, px[i], py[i], scale, r2, &d);
        T ax = d.x > 0 ? d.x : -d.x, L = FN(log1p_01)(FN(exp_neg)(-ax));
        sp[i] = -d.keep * ((d.x > 0 ? d.x : 0) + L);
        FN(Bary) bb;
        FN(bary)(f, &d, &bb);
        T lw = d.keep > 0 ? (d.x < 0 ? d.x : 0) - L - bb.depth * kz : -INFINITY;
        T t = tg[i] > lw ? tg[i] : lw;
        int none = t == -INFINITY;
        tn[i] = t;
        wa[i] = none ? 1 : FN(exp_neg)(tg[i] - t);
        wb[i] = none ? 0 : FN(exp_neg)(lw - t);
        dep[i] = bb.depth, l0[i] = bb.lam[0], l1[i] = bb.lam[1], l2[i] = bb.lam[2];
    }
}

/* J: dsv = σ(x) dx; with blending (blend != 0) also the normalized weight wh, dlogw, the depth channel's
   dO term (written over O0, which holds the blended depth on entry), λ and dλ */
KERNEL FN(k_tangent)(const T R_ f_, const T R_ dt_, const T R_ px, const T R_ py, int cnt, T scale, T r2, T kz,
                     int blend, const T R_ top, const T R_ den, T R_ O0, T R_ dsv, T R_ wh_, T R_ dlw_, T R_ l0,
                     T R_ l1, T R_ l2, T R_ m0, T R_ m1, T R_ m2) {
    T f[ROWS];
    for (int k = 0; k < ROWS; k++) f[k] = f_[k]; /* local copies: invariant loads the vectorizer can hoist */
    T dt[ROWS];
    for (int k = 0; k < ROWS; k++) dt[k] = dt_[k];
    FN(Tangent) tg = FN(tangent_row)(dt);
    if (!blend) {
#pragma omp simd
        for (int i = 0; i < cnt; i++) {
            FN(Dist) d;
            FN(distance)(f, px[i], py[i], scale, r2, &d);
            T ax = d.x > 0 ? d.x : -d.x;
            dsv[i] = FN(sigmoid)(d.x, FN(exp_neg)(-ax)) * d.keep * FN(dlogit)(&d, tg);
        }
        return;
    }
#pragma omp simd
    for (int i = 0; i < cnt; i++) {
        FN(Dist) d;
        FN(distance)(f, px[i], py[i], scale, r2, &d);
        T dx_ = d.keep * FN(dlogit)(&d, tg);
        T ax = d.x > 0 ? d.x : -d.x, e = FN(exp_neg)(-ax);
        dsv[i] = FN(sigmoid)(d.x, e) * dx_;
        FN(Bary) bb;
        FN(bary)(f, &d, &bb);
        T dl[3], du[3], dS = 0, dU = 0;
        for (int k = 0; k < 3; k++) {
            T dE = dt[EX + k] * d.dy[k] - dt[EY + k] * d.dx[k] - f[EX + k] * dt[SY + k] + f[EY + k] * dt[SX + k];
            dl[k] = bb.pos[k] ? dE * f[IA] + d.E[k] * dt[IA] : 0;
            dS += dl[k];
            du[k] = (dl[k] - bb.u[k] * dt[Z + k]) / f[Z + k];
            dU += du[k];
        }
        T ddepth = (dS - bb.depth * dU) / bb.U;
        T lw = (d.x < 0 ? d.x : 0) - FN(log1p_01)(e) - bb.depth * kz;
        T wh = d.keep > 0 ? FN(exp_neg)(lw - top[i]) / den[i] : 0;
        T dlw = FN(sigmoid)(-d.x, e) * dx_ - ddepth * kz;
        O0[i] = wh * (ddepth + (bb.depth - O0[i]) * dlw);
        wh_[i] = wh, dlw_[i] = dlw, l0[i] = bb.lam[0], l1[i] = bb.lam[1], l2[i] = bb.lam[2];
        m0[i] = (du[0] - bb.lam[0] * dU) / bb.U;
        m1[i] = (du[1] - bb.lam[1] * dU) / bb.U;
        m2[i] = (du[2] - bb.lam[2] * dU) / bb.U;
    }
}

/* J, one attribute channel: Oc (the blended value on entry) becomes ŵ (dF + (F - O) dlogw) */
KERNEL FN(k_tangent_channel)(int cnt, const T R_ wh_, const T R_ dlw_, const T R_ l0, const T R_ l1, const T R_ l2,
                             const T R_ m0, const T R_ m1, const T R_ m2, T x0, T x1, T x2, T y0, T y1, T y2,
                             T R_ Oc) {
#pragma omp simd
    for (int i = 0; i < cnt; i++) {
        T fc = l0[i] * x0 + l1[i] * x1 + l2[i] * x2;
        T dfc = m0[i] * x0 + m1[i] * x1 + m2[i] * x2 + l0[i] * y0 + l1[i] * y1 + l2[i] * y2;
        Oc[i] = wh_[i] * (dfc + (fc - Oc[i]) * dlw_[i]);
    }
}

/* Jᵀ with blending, first pass: normalized weights, λ, and ∂L/∂logw from the depth channel */
KERNEL FN(k_weights)(const T R_ f_, const T R_ px, const T R_ py, int cnt, T scale, T r2, T kz, const T R_ top,
                     const T R_ den, const T R_ G0, const T R_ O0, T R_ wh_, T R_ gw_, T R_ l0, T R_ l1, T R_ l2) {
    T f[ROWS];
    for (int k = 0; k < ROWS; k++) f[k] = f_[k]; /* local copies: invariant loads the vectorizer can hoist */
#pragma omp simd
    for (int i = 0; i < cnt; i++) {
        FN(Dist) d;
        FN(distance)(f, px[i], py[i], scale, r2, &d);
        FN(Bary) bb;
        FN(bary)(f, &d, &bb);
        T ax = d.x > 0 ? d.x : -d.x, e = FN(exp_neg)(-ax);
        T lw = (d.x < 0 ? d.x : 0) - FN(log1p_01)(e) - bb.depth * kz;
        wh_[i] = d.keep > 0 ? FN(exp_neg)(lw - top[i]) / den[i] : 0;
        l0[i] = bb.lam[0], l1[i] = bb.lam[1], l2[i] = bb.lam[2];
        gw_[i] = G0[i] * (bb.depth - O0[i]);
    }
}

/* Jᵀ, one attribute channel: adds to ∂L/∂logw and ∂L/∂λ_k; returns the block's ∂L/∂a_k in s[0..2] */
KERNEL FN(k_adjoint_channel)(int cnt, const T R_ wh_, const T R_ l0, const T R_ l1, const T R_ l2, const T R_ Gc,
                             const T R_ Oc, T x0, T x1, T x2, T R_ gw_, T R_ g0, T R_ g1, T R_ g2, T R_ s) {
    T s0 = 0, s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s0, s1, s2)
    for (int i = 0; i < cnt; i++) {
        T gf = wh_[i] * Gc[i];
        gw_[i] += Gc[i] * (l0[i] * x0 + l1[i] * x1 + l2[i] * x2 - Oc[i]);
        g0[i] += gf * x0, g1[i] += gf * x1, g2[i] += gf * x2;
        s0 += l0[i] * gf, s1 += l1[i] * gf, s2 += l2[i] * gf;
    }
    s[0] = s0, s[1] = s1, s[2] = s2;
}

/* Jᵀ, last pass: back through barycentrics (blend != 0) and the distance into the face's table row,
   summed over the block into acc[19] */
KERNEL FN(k_adjoint)(const T R_ f_, const T R_ px, const T R_ py, int cnt, T scale, T r2, T kz, int blend,
                     const T R_ ga, const T R_ wh_, const T R_ gw_, const T R_ G0, const T R_ g0, const T R_ g1,
                     const T R_ g2, T R_ acc) {
    T f[ROWS];
    for (int k = 0; k < ROWS; k++) f[k] = f_[k]; /* local copies: invariant loads the vectorizer can hoist */
    T s_sx0 = 0, s_sx1 = 0, s_sx2 = 0, s_sy0 = 0, s_sy1 = 0, s_sy2 = 0, s_ex0 = 0, s_ex1 = 0, s_ex2 = 0;
    T s_ey0 = 0, s_ey1 = 0, s_ey2 = 0, s_z0 = 0, s_z1 = 0, s_z2 = 0, s_ia = 0;
#pragma omp simd reduction(+ : s_sx0, s_sx1, s_sx2, s_sy0, s_sy1, s_sy2, s_ex0, s_ex1, s_ex2, s_ey0, s_ey1, s_ey2, \
                               s_z0, s_z1, s_z2, s_ia)
    for (int i = 0; i < cnt; i++) {
        FN(Dist) d;
        FN(distance)(f, px[i], py[i], scale, r2, &d);
        T ax = d.x > 0 ? d.x : -d.x, e = FN(exp_neg)(-ax);
        T gx = d.keep * ga[i] * FN(sigmoid)(d.x, e);
        T gE0 = 0, gE1 = 0, gE2 = 0, gz0 = 0, gz1 = 0, gz2 = 0, gia = 0;
        if (blend) {
            FN(Bary) bb;
            FN(bary)(f, &d, &bb);
            T wh = wh_[i], glw = wh * gw_[i];
            T gdepth = wh * G0[i] - glw * kz;
            gx += d.keep * FN(sigmoid)(-d.x, e) * glw;
            T dot = g0[i] * bb.lam[0] + g1[i] * bb.lam[1] + g2[i] * bb.lam[2], gSum = gdepth / bb.U;
            T gu0 = (g0[i] - dot - gdepth * bb.depth) / bb.U, gu1 = (g1[i] - dot - gdepth * bb.depth) / bb.U;
            T gu2 = (g2[i] - dot - gdepth * bb.depth) / bb.U;
            gz0 = -gu0 * bb.u[0] / f[Z], gz1 = -gu1 * bb.u[1] / f[Z + 1], gz2 = -gu2 * bb.u[2] / f[Z + 2];
            T gb0 = bb.pos[0] ? gu0 / f[Z] + gSum : 0, gb1 = bb.pos[1] ? gu1 / f[Z + 1] + gSum : 0;
            T gb2 = bb.pos[2] ? gu2 / f[Z + 2] + gSum : 0;
            gia = gb0 * d.E[0] + gb1 * d.E[1] + gb2 * d.E[2];
            gE0 = gb0 * f[IA], gE1 = gb1 * f[IA], gE2 = gb2 * f[IA];
        }
        /* E_k = ex·(py - sy) - ey·(px - sx); d² through Danskin's theorem as in dlogit */
        T c2 = -2 * gx * d.sg, hx = c2 * d.rx, hy = c2 * d.ry;
        int k = d.k;
        s_sx0 += gE0 * f[EY] + (k == 0 ? hx : 0), s_sx1 += gE1 * f[EY + 1] + (k == 1 ? hx : 0);
        s_sx2 += gE2 * f[EY + 2] + (k == 2 ? hx : 0);
        s_sy0 += -gE0 * f[EX] + (k == 0 ? hy : 0), s_sy1 += -gE1 * f[EX + 1] + (k == 1 ? hy : 0);
        s_sy2 += -gE2 * f[EX + 2] + (k == 2 ? hy : 0);
        s_ex0 += gE0 * d.dy[0] + (k == 0 ? d.t * hx : 0), s_ex1 += gE1 * d.dy[1] + (k == 1 ? d.t * hx : 0);
        s_ex2 += gE2 * d.dy[2] + (k == 2 ? d.t * hx : 0);
        s_ey0 += -gE0 * d.dx[0] + (k == 0 ? d.t * hy : 0), s_ey1 += -gE1 * d.dx[1] + (k == 1 ? d.t * hy : 0);
        s_ey2 += -gE2 * d.dx[2] + (k == 2 ? d.t * hy : 0);
        s_z0 += gz0, s_z1 += gz1, s_z2 += gz2, s_ia += gia;
    }
    acc[SX] = s_sx0, acc[SX + 1] = s_sx1, acc[SX + 2] = s_sx2, acc[SY] = s_sy0, acc[SY + 1] = s_sy1;
    acc[SY + 2] = s_sy2, acc[EX] = s_ex0, acc[EX + 1] = s_ex1, acc[EX + 2] = s_ex2, acc[EY] = s_ey0;
    acc[EY + 1] = s_ey1, acc[EY + 2] = s_ey2, acc[Z] = s_z0, acc[Z + 1] = s_z1, acc[Z + 2] = s_z2, acc[IA] = s_ia;
}

/* Gathers and scatters between a block and the band's pixel planes. A block's pixels are distinct (one face
   covers a pixel once), so the scatters vectorize where the CPU has scatter instructions. */
KERNEL FN(k_gather)(const T R_ src, int64_t stride, const int32_t R_ lp, int cnt, T R_ dst) {
#pragma omp simd
    for (int i = 0; i < cnt; i++) dst[i] = src[lp[i] * stride];
}

KERNEL FN(k_scatter_add)(T R_ dst, const int32_t R_ lp, int cnt, const T R_ v) {
#pragma omp simd
    for (int i = 0; i < cnt; i++) dst[lp[i]] += v[i];
}

/* online softmax step: plane[q] = plane[q]·wa + wb·value for the block's pixels q */
KERNEL FN(k_scatter_blend)(T R_ dst, const int32_t R_ lp, int cnt, const T R_ wa, const T R_ wb, const T R_ v) {
#pragma omp simd
    for (int i = 0; i < cnt; i++) dst[lp[i]] = dst[lp[i]] * wa[i] + wb[i] * v[i];
}

/* Forward sweep over bands [b_lo, b_hi): silhouette α = 1 - Π(1 - D_j) = -expm1(Σ log(1 - D_j)) and, when
   blending, the SoftRas softmax of [depth, attributes] with log-weights log sigmoid(x_j) - depth_j·kz
   (z̃/γ up to a constant, which the normalized blend ignores), accumulated online per pixel: the running
   maximum is subtracted, as in raster/soft.py's blend. Returns -1 if scratch memory ran out. */
int FN(dr_forward)(const Params *p, int64_t b_lo, int64_t b_hi) {
    const T *A = p->attrs;
    T *alpha = p->alpha, *out = p->out, *state = p->state;
    int64_t C = p->C, NP = p->NP, npx = p->band_rows * p->W;
    int blend = (int)p->blend;
    T scale = (T)p->scale, r2 = (T)p->r2, kz = (T)p->kz, f[ROWS];
    T *buf = malloc((size_t)(npx * (3 + 1 + C)) * sizeof(T));
    if (!buf) return -1;
    FN(Block) blk;
    T sp[BLK], tg[BLK], tn[BLK], wa[BLK], wb[BLK], dep[BLK], l0[BLK], l1[BLK], l2[BLK], one[BLK], val[BLK];
    for (int64_t b = b_lo; b < b_hi; b++) {
        BAND_GEOMETRY(p, b);
        T *S = buf, *TOP = buf + bpx, *DEN = buf + 2 * bpx, *NUM = buf + 3 * bpx; /* planes of bpx values */
        for (int64_t i = 0; i < bpx; i++) S[i] = DEN[i] = 0, TOP[i] = -INFINITY;
        if (blend) memset(NUM, 0, (size_t)(bpx * (1 + C)) * sizeof(T));
        int64_t r = p->band_off[b], off = 0;
        while (FN(next_block)(p, p->band_off[b + 1], base, &r, &off, &blk)) {
            BLOCK_FACE(p, blk, f);
            int cnt = blk.n;
            if (!blend) {
                FN(k_cover)(f, blk.px, blk.py, cnt, scale, r2, sp);
                FN(k_scatter_add)(S, blk.lp, cnt, sp); /* sp holds log(1 - D) */
                continue;
            }
            FN(k_gather)(TOP, 1, blk.lp, cnt, tg);
            FN(k_cover_blend)(f, blk.px, blk.py, cnt, scale, r2, kz, tg, sp, tn, wa, wb, dep, l0, l1, l2);
            FN(k_scatter_add)(S, blk.lp, cnt, sp);
            for (int i = 0; i < cnt; i++) TOP[blk.lp[i]] = tn[i], one[i] = 1;
            FN(k_scatter_blend)(DEN, blk.lp, cnt, wa, wb, one);
            FN(k_scatter_blend)(NUM, blk.lp, cnt, wa, wb, dep);
            for (int64_t c = 0; c < C; c++) {
                T x0 = A[fv[0] * C + c], x1 = A[fv[1] * C + c], x2 = A[fv[2] * C + c];
                for (int i = 0; i < cnt; i++) val[i] = l0[i] * x0 + l1[i] * x1 + l2[i] * x2;
                FN(k_scatter_blend)(NUM + (1 + c) * bpx, blk.lp, cnt, wa, wb, val);
            }
        }
        for (int64_t i = 0; i < bpx; i++) {
            int64_t q = base + i;
            alpha[q] = (T)(-expm1((double)S[i]));
            state[q] = S[i];
            state[NP + q] = TOP[i];
            state[2 * NP + q] = DEN[i];
            if (blend)
                for (int64_t c = 0; c <= C; c++) out[q * (1 + C) + c] = DEN[i] > 0 ? NUM[c * bpx + i] / DEN[i] : 0;
        }
    }
    free(buf);
    return 0;
}

/* Forward-mode product J·(t_xy, t_z, t_attrs) over bands [b_lo, b_hi), from the forward's per-pixel state:
   dα = exp(s) Σ_j σ(x_j) dx_j and dO_c = Σ_j ŵ_j (dF_jc + (F_jc - O_c) dlogw_j), ŵ_j the normalized
   weights, F_j = [depth_j, Σ_k λ_jk a_k]. */
int FN(dr_jvp)(const Params *p, int64_t b_lo, int64_t b_hi) {
    const T *A = p->attrs, *tA = p->t_attrs, *out = p->out, *state = p->state;
    T *t_alpha = p->t_alpha, *t_out = p->t_out;
    int64_t C = p->C, NP = p->NP, npx = p->band_rows * p->W;
    int blend = (int)p->blend;
    T scale = (T)p->scale, r2 = (T)p->r2, kz = (T)p->kz, f[ROWS], dt[ROWS];
    T *buf = malloc((size_t)(npx * (2 + C) + BLK * (1 + C)) * sizeof(T));
    if (!buf) return -1;
    FN(Block) blk;
    T top[BLK], den[BLK], dsv[BLK], wh_[BLK], dlw_[BLK], l0[BLK], l1[BLK], l2[BLK], m0[BLK], m1[BLK], m2[BLK];
    T *Og = buf + npx * (2 + C); /* (1 + C) planes of BLK: the block's blended values, then their tangents */
    for (int64_t b = b_lo; b < b_hi; b++) {
        BAND_GEOMETRY(p, b);
        T *DS = buf, *DO = buf + bpx; /* planes of bpx values: dα sums, then dO per channel */
        memset(buf, 0, (size_t)(bpx * (2 + C)) * sizeof(T));
        int64_t r = p->band_off[b], off = 0;
        while (FN(next_block)(p, p->band_off[b + 1], base, &r, &off, &blk)) {
            BLOCK_FACE(p, blk, f);
            FN(face_row_tangent)(p->t_xy, p->t_z, fv, n, p->V, f, dt);
            int cnt = blk.n;
            if (blend) {
                FN(k_gather)(state + NP + base, 1, blk.lp, cnt, top);
                FN(k_gather)(state + 2 * NP + base, 1, blk.lp, cnt, den);
                for (int64_t c = 0; c <= C; c++) FN(k_gather)(out + base * (1 + C) + c, 1 + C, blk.lp, cnt, Og + c * BLK);
            }
            FN(k_tangent)(f, dt, blk.px, blk.py, cnt, scale, r2, kz, blend, top, den, Og, dsv, wh_, dlw_, l0, l1, l2,
                          m0, m1, m2);
            FN(k_scatter_add)(DS, blk.lp, cnt, dsv);
            if (!blend) continue;
            FN(k_scatter_add)(DO, blk.lp, cnt, Og);
            for (int64_t c = 0; c < C; c++) {
                T *Oc = Og + (1 + c) * BLK;
                FN(k_tangent_channel)(cnt, wh_, dlw_, l0, l1, l2, m0, m1, m2, A[fv[0] * C + c], A[fv[1] * C + c],
                                      A[fv[2] * C + c], tA[fv[0] * C + c], tA[fv[1] * C + c], tA[fv[2] * C + c], Oc);
                FN(k_scatter_add)(DO + (1 + c) * bpx, blk.lp, cnt, Oc);
            }
        }
        for (int64_t i = 0; i < bpx; i++) {
            int64_t q = base + i;
            t_alpha[q] = (T)(exp((double)state[q]) * DS[i]);
            if (blend)
                for (int64_t c = 0; c <= C; c++) t_out[q * (1 + C) + c] = DO[c * bpx + i];
        }
    }
    free(buf);
    return 0;
}

/* J for a batch of B tangent sets at once, silhouette only (blend == 0): a dense Jacobian's columns. Each
   pair's geometry (its nearest edge, the projection parameter and the factor σ(x)·keep·sg·(-2) of dlogit)
   is computed once per block and shared by the B tangents, which a loop over dr_jvp would recompute B
   times. t_xy (B, N, V, 2), t_z (B, N, V) and t_alpha (B, NP), contiguous. */
KERNEL FN(k_geometry)(const T R_ f_, const T R_ px, const T R_ py, int cnt, T scale, T r2, T R_ a, T R_ rx,
                      T R_ ry, T R_ tt, int32_t R_ kk) {
    T f[ROWS];
    for (int k = 0; k < ROWS; k++) f[k] = f_[k]; /* local copies: invariant loads the vectorizer can hoist */
#pragma omp simd
    for (int i = 0; i < cnt; i++) {
        FN(Dist) d;
        FN(distance)(f, px[i], py[i], scale, r2, &d);
        T ax = d.x > 0 ? d.x : -d.x;
        a[i] = FN(sigmoid)(d.x, FN(exp_neg)(-ax)) * d.keep * d.sg * -2;
        rx[i] = d.rx, ry[i] = d.ry, tt[i] = d.t, kk[i] = d.k;
    }
}

KERNEL FN(k_dlogit_many)(int cnt, const T R_ a, const T R_ rx, const T R_ ry, const T R_ tt, const int32_t R_ kk,
                         const T R_ dt, T R_ dsv) {
    FN(Tangent) tg = FN(tangent_row)(dt);
#pragma omp simd
    for (int i = 0; i < cnt; i++) dsv[i] = a[i] * FN(edge_move)(kk[i], rx[i], ry[i], tt[i], tg);
}

int FN(dr_jvp_many)(const Params *p, int64_t B, int64_t b_lo, int64_t b_hi) {
    const T *state = p->state, *t_xy = p->t_xy, *t_z = p->t_z;
    T *t_alpha = p->t_alpha;
    int64_t NP = p->NP, npx = p->band_rows * p->W, nv = NP / (p->H * p->W) * p->V;
    T scale = (T)p->scale, r2 = (T)p->r2, f[ROWS], dt[ROWS];
    T *buf = malloc((size_t)(npx * B) * sizeof(T) + 1);
    if (!buf) return -1;
    FN(Block) blk;
    T a[BLK], rx[BLK], ry[BLK], tt[BLK], dsv[BLK];
    int32_t kk[BLK];
    for (int64_t b = b_lo; b < b_hi; b++) {
        BAND_GEOMETRY(p, b);
        memset(buf, 0, (size_t)(bpx * B) * sizeof(T));
        int64_t r = p->band_off[b], off = 0;
        while (FN(next_block)(p, p->band_off[b + 1], base, &r, &off, &blk)) {
            BLOCK_FACE(p, blk, f);
            int cnt = blk.n;
            FN(k_geometry)(f, blk.px, blk.py, cnt, scale, r2, a, rx, ry, tt, kk);
            for (int64_t j = 0; j < B; j++) {
                FN(face_row_tangent)(t_xy + 2 * nv * j, t_z + nv * j, fv, n, p->V, f, dt);
                FN(k_dlogit_many)(cnt, a, rx, ry, tt, kk, dt, dsv);
                FN(k_scatter_add)(buf + bpx * j, blk.lp, cnt, dsv);
            }
        }
        for (int64_t i = 0; i < bpx; i++) {
            double e = exp((double)state[base + i]);
            for (int64_t j = 0; j < B; j++) t_alpha[NP * j + base + i] = (T)(e * buf[bpx * j + i]);
        }
    }
    free(buf);
    return 0;
}

/* A silhouette's J at the forward's point as explicit per-pair coefficients (blend == 0), for fits that
   apply J and Jᵀ many times at one point (a Gauss-Newton step's CG products): dr_jvp's dα_q = exp(s_q) Σ_j
   σ(x_j) dx_j with dx_j = sg·(-2)·r·(ds_k + t de_k) (dlogit) is, for the nearest edge k from vertex a =
   v_{k+1} to b = v_{k+2}, dα_q += c·((1 - t) dv_a + t dv_b) with c = exp(s_q)·σ(x)·keep·sg·(-2)·r. Row i of
   coef (P, 4) holds c(1 - t) and c t (x, y each), row i of idx (P, 3) the pixel q and the flat indices
   n·V + v of a and b; pair i is the i-th pair of the sweep (pair_off[b] + its place in band b). Rows of
   faces skipped under culling are left as they are (zeros). */
int FN(dr_coef)(const Params *p, int64_t b_lo, int64_t b_hi) {
    const T *state = p->state;
    T *coef = p->c_coef;
    int32_t *idx = p->c_idx;
    T scale = (T)p->scale, r2 = (T)p->r2, f[ROWS];
    FN(Block) blk;
    T a[BLK], rx[BLK], ry[BLK], tt[BLK];
    int32_t kk[BLK];
    for (int64_t b = b_lo; b < b_hi; b++) {
        BAND_GEOMETRY(p, b);
        (void)bpx;
        int64_t r = p->band_off[b], off = 0, next = p->pair_off[b];
        while (FN(next_block)(p, p->band_off[b + 1], base, &r, &off, &blk)) {
            int64_t row = next;
            next += blk.n;
            BLOCK_FACE(p, blk, f);
            int cnt = blk.n;
            FN(k_geometry)(f, blk.px, blk.py, cnt, scale, r2, a, rx, ry, tt, kk);
            for (int i = 0; i < cnt; i++, row++) {
                int64_t q = base + blk.lp[i];
                T c = (T)(exp((double)state[q]) * a[i]), ca = c * (1 - tt[i]), cb = c * tt[i];
                coef[4 * row] = ca * rx[i], coef[4 * row + 1] = ca * ry[i];
                coef[4 * row + 2] = cb * rx[i], coef[4 * row + 3] = cb * ry[i];
                idx[3 * row] = (int32_t)q;
                idx[3 * row + 1] = (int32_t)(n * p->V + fv[(kk[i] + 1) % 3]);
                idx[3 * row + 2] = (int32_t)(n * p->V + fv[(kk[i] + 2) % 3]);
            }
        }
    }
    return 0;
}

/* J and Jᵀ from dr_coef's rows [lo, hi): t_alpha[q] += c·(t_a, t_b) and g_xy[a], g_xy[b] += c g_alpha[q].
   t_xy and g_xy are (N·V, 2); rows of different bands have different pixels, so J's threads (split by
   bands) write disjoint pixels, while Jᵀ's each get their own g_xy. */
void FN(dr_coef_jvp)(const T *coef, const int32_t *idx, int64_t lo, int64_t hi, const T *t_xy, T *t_alpha) {
    for (int64_t i = lo; i < hi; i++) {
        const T *c = coef + 4 * i, *ta = t_xy + 2 * (int64_t)idx[3 * i + 1], *tb = t_xy + 2 * (int64_t)idx[3 * i + 2];
        t_alpha[idx[3 * i]] += c[0] * ta[0] + c[1] * ta[1] + c[2] * tb[0] + c[3] * tb[1];
    }
}

void FN(dr_coef_vjp)(const T *coef, const int32_t *idx, int64_t lo, int64_t hi, const T *g_alpha, T *g_xy) {
    for (int64_t i = lo; i < hi; i++) {
        const T *c = coef + 4 * i, g = g_alpha[idx[3 * i]];
        T *ga = g_xy + 2 * (int64_t)idx[3 * i + 1], *gb = g_xy + 2 * (int64_t)idx[3 * i + 2];
        ga[0] += c[0] * g, ga[1] += c[1] * g, gb[0] += c[2] * g, gb[1] += c[3] * g;
    }
}

/* Reverse-mode product Jᵀ·(g_alpha, g_out) over bands [b_lo, b_hi), accumulated into g_xy (N, V, 2), g_z
   (N, V) and g_attrs (V, C) (the caller gives each thread its own). The transpose of dr_jvp; all pixels of a
   block share one face, so their contributions are summed before they are added. */
int FN(dr_vjp)(const Params *p, int64_t b_lo, int64_t b_hi) {
    const T *A = p->attrs, *ga_ = p->g_alpha, *G = p->g_out, *out = p->out, *state = p->state;
    T *gA = p->g_attrs;
    int64_t C = p->C, NP = p->NP, npx = p->band_rows * p->W;
    int blend = (int)p->blend;
    T scale = (T)p->scale, r2 = (T)p->r2, kz = (T)p->kz, f[ROWS], acc[ROWS], s3[3];
    T *buf = malloc((size_t)(npx + 2 * BLK * (1 + C)) * sizeof(T));
    if (!buf) return -1;
    T *GA = buf, *Og = buf + npx, *Gg = Og + BLK * (1 + C); /* block planes: blended values, their cotangents */
    FN(Block) blk;
    T ga[BLK], top[BLK], den[BLK], wh_[BLK], gw_[BLK], l0[BLK], l1[BLK], l2[BLK], g0[BLK], g1[BLK], g2[BLK];
    for (int64_t b = b_lo; b < b_hi; b++) {
        BAND_GEOMETRY(p, b);
        for (int64_t i = 0; i < bpx; i++) GA[i] = (T)((double)ga_[base + i] * exp((double)state[base + i]));
        int64_t r = p->band_off[b], off = 0;
        while (FN(next_block)(p, p->band_off[b + 1], base, &r, &off, &blk)) {
            BLOCK_FACE(p, blk, f);
            int cnt = blk.n;
            FN(k_gather)(GA, 1, blk.lp, cnt, ga);
            if (blend) {
                FN(k_gather)(state + NP + base, 1, blk.lp, cnt, top);
                FN(k_gather)(state + 2 * NP + base, 1, blk.lp, cnt, den);
                for (int64_t c = 0; c <= C; c++) {
                    FN(k_gather)(out + base * (1 + C) + c, 1 + C, blk.lp, cnt, Og + c * BLK);
                    FN(k_gather)(G + base * (1 + C) + c, 1 + C, blk.lp, cnt, Gg + c * BLK);
                }
                for (int i = 0; i < cnt; i++) g0[i] = g1[i] = g2[i] = 0;
                FN(k_weights)(f, blk.px, blk.py, cnt, scale, r2, kz, top, den, Gg, Og, wh_, gw_, l0, l1, l2);
                for (int64_t c = 0; c < C; c++) {
                    FN(k_adjoint_channel)(cnt, wh_, l0, l1, l2, Gg + (1 + c) * BLK, Og + (1 + c) * BLK, A[fv[0] * C + c],
                                          A[fv[1] * C + c], A[fv[2] * C + c], gw_, g0, g1, g2, s3);
                    gA[fv[0] * C + c] += s3[0], gA[fv[1] * C + c] += s3[1], gA[fv[2] * C + c] += s3[2];
                }
            }
            FN(k_adjoint)(f, blk.px, blk.py, cnt, scale, r2, kz, blend, ga, wh_, gw_, Gg, g0, g1, g2, acc);
            FN(face_row_adjoint)(acc, fv, n, p->V, f, p->g_xy, p->g_z);
        }
    }
    free(buf);
    return 0;
}

#endif
