/* Compiled kernel of the window engine (streamd/windows.py): the same algorithm, tick by tick.
 *
 * A batch of a few ticks costs the NumPy engine ~100 NumPy calls per signal whatever its size;
 * here it costs one C call to group it and one per signal. The kernel works on the engine's own state (the per-key tables
 * and the tick pool, passed as buffers) and makes exactly the same decisions per key (restrict,
 * window start, eviction, growth, flip), so the two paths can take turns batch by batch. The
 * NumPy engine is the reference: tests/test_windows.py checks this file against it.
 *
 * Compiled ahead of time (setup.py), so nothing here needs writable and executable memory. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Sum kinds (windows.py _SUM_NAMES) and stat codes (streamd.config.WINDOW_STATS), same order. */
enum { SX, SXX, SQ, SXQ, SA, SN, MAX_SUMS };
enum { ST_COUNT, ST_SUM, ST_MEAN, ST_STD, ST_VAR, ST_MIN, ST_MAX, ST_FIRST, ST_LAST, ST_VOLUME, ST_VWAP, ST_ZSCORE };
/* Columns of the per-key tables, as in windows.py. */
enum { OFF, CAP, HEAD, SPLIT, END, RUN, N_INT };
enum { CENTRE, BACK_MIN, BACK_MAX, LAST, SUMS, DRIFTS = SUMS + MAX_SUMS, N_FLOAT = DRIFTS + MAX_SUMS };
#define MIN_CAP 8
/* windows.py _ROUNDOFF, _DRIFT and _MAGNITUDE_SHARE. */
#define ROUNDOFF 0x1p-53
#define DRIFT 1e-10
#define MAGNITUDE_SHARE 1e-2

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static int get_buffer(PyObject *obj, Buf *buf, Py_ssize_t itemsize, int writable) {
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &buf->view, flags) < 0) return -1;
    buf->held = 1;
    if (buf->view.len % itemsize != 0) {
        PyErr_SetString(PyExc_ValueError, "buffer size is not a multiple of the item size");
        return -1;
    }
    return 0;
}

static void release(Buf *bufs, int count) {
    for (int i = 0; i < count; i++) {
        if (bufs[i].held) PyBuffer_Release(&bufs[i].view);
    }
}

#define I64(b) ((int64_t *)(b).view.buf)
#define F64(b) ((double *)(b).view.buf)
#define LEN(b, type) ((b).view.len / (Py_ssize_t)sizeof(type))

static int64_t next_pow2(int64_t value) {
    int64_t cap = 1;
    while (cap < value) cap <<= 1;
    return cap;
}

/* Stable sort of indices by slot: insertion sort on runs of 16, then bottom-up merges. */
static void sort_by_slot(const int64_t *slots, int64_t *index, int64_t *spare, Py_ssize_t n) {
    const Py_ssize_t run = 16;
    for (Py_ssize_t i = 0; i < n; i++) index[i] = i;
    for (Py_ssize_t lo = 0; lo < n; lo += run) {
        Py_ssize_t hi = lo + run < n ? lo + run : n;
        for (Py_ssize_t i = lo + 1; i < hi; i++) {
            int64_t item = index[i];
            Py_ssize_t j = i;
            while (j > lo && slots[index[j - 1]] > slots[item]) {
                index[j] = index[j - 1];
                j--;
            }
            index[j] = item;
        }
    }
    int64_t *from = index, *to = spare;
    for (Py_ssize_t width = run; width < n; width *= 2) {
        for (Py_ssize_t lo = 0; lo < n; lo += 2 * width) {
            Py_ssize_t mid = lo + width < n ? lo + width : n, hi = lo + 2 * width < n ? lo + 2 * width : n;
            Py_ssize_t a = lo, b = mid, k = lo;
            while (a < mid && b < hi) to[k++] = slots[from[b]] < slots[from[a]] ? from[b++] : from[a++];
            while (a < mid) to[k++] = from[a++];
            while (b < hi) to[k++] = from[b++];
        }
        int64_t *swap = from;
        from = to;
        to = swap;
    }
    if (from != index) memcpy(index, from, (size_t)n * sizeof(int64_t));
}

PyDoc_STRVAR(accept_doc,
             "accept(slots, t, p, q, last_t, scratch, keys, starts, t_last, bt, bp, bq) -> "
             "(groups, accepted, late, new_keys) or (-1, needed_last_t_size, 0, 0)\n\n"
             "Group a batch by key (arrival order within a key), drop late ticks, update last_t.");

static PyObject *accept(PyObject *self, PyObject *args) {
    PyObject *o[12];
    Buf b[12] = {0};
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8],
                          &o[9], &o[10], &o[11]))
        return NULL;
    for (int i = 0; i < 12; i++) {
        if (get_buffer(o[i], &b[i], 8, i >= 4) < 0) {
            release(b, 12);
            return NULL;
        }
    }
    const int64_t *slots = I64(b[0]), *t = I64(b[1]);
    const double *p = F64(b[2]), *q = F64(b[3]);
    int64_t *last_t = I64(b[4]), *index = I64(b[5]), *keys = I64(b[6]), *starts = I64(b[7]), *t_last = I64(b[8]);
    int64_t *bt = I64(b[9]);
    double *bp = F64(b[10]), *bq = F64(b[11]);
    Py_ssize_t n = LEN(b[0], int64_t), table = LEN(b[4], int64_t);
    int64_t top = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (slots[i] < 0) {
            release(b, 12);
            PyErr_SetString(PyExc_ValueError, "negative slot");
            return NULL;
        }
        if (slots[i] > top) top = slots[i];
    }
    if (top >= table) {
        release(b, 12);
        return Py_BuildValue("(nLnn)", (Py_ssize_t)-1, (long long)(top + 1), (Py_ssize_t)0, (Py_ssize_t)0);
    }
    sort_by_slot(slots, index, index + n, n);
    Py_ssize_t groups = 0, kept = 0, late = 0, new_keys = 0;
    for (Py_ssize_t i = 0; i < n;) {
        int64_t slot = slots[index[i]], previous = last_t[slot], newest = previous;
        Py_ssize_t first = kept;
        for (; i < n && slots[index[i]] == slot; i++) {
            int64_t tick = index[i];
            if (t[tick] < newest) {
                late++;
                continue;
            }
            newest = t[tick];
            bt[kept] = t[tick];
            bp[kept] = p[tick];
            bq[kept] = q[tick];
            kept++;
        }
        if (kept > first) {
            keys[groups] = slot;
            starts[groups] = first;
            t_last[groups] = newest;
            groups++;
            new_keys += previous == INT64_MIN;
            last_t[slot] = newest;
        }
    }
    starts[groups] = kept;
    release(b, 12);
    return Py_BuildValue("(nnnn)", groups, kept, late, new_keys);
}

/* Per-tick terms of each kept running sum (x = p - centre), and their magnitudes. */
static void add_terms(double *totals, double *magnitudes, const int64_t *kinds, int n_sums, double p, double centre,
                      double q) {
    double x = p - centre, term;
    for (int s = 0; s < n_sums; s++) {
        switch (kinds[s]) {
        case SX: term = x; break;
        case SXX: term = x * x; break;
        case SQ: term = q; break;
        case SXQ: term = x * q; break;
        case SA: term = fabs(p); break;
        default: term = q != 0.0; break;
        }
        totals[s] += term;
        magnitudes[s] += fabs(term);
    }
}

typedef struct {
    int64_t *ints;
    double *floats, *p, *q, *fmin, *fmax;
    int64_t *t;
    const int64_t *kinds;
    int n_sums, is_time, extremes;
    int64_t size;
} Ring;

/* A key's running sums and drift bounds by kind (zero where not kept), and which are kept. */
typedef struct {
    double total[MAX_SUMS], bound[MAX_SUMS];
    int kept[MAX_SUMS];
} Sums;

static Sums sums_of(const Ring *r, const double *row) {
    Sums sums = {{0}, {0}, {0}};
    for (int s = 0; s < r->n_sums; s++) {
        sums.total[r->kinds[s]] = row[SUMS + s];
        sums.bound[r->kinds[s]] = row[DRIFTS + s];
        sums.kept[r->kinds[s]] = 1;
    }
    return sums;
}

/* Add segment totals to a key's running sums and grow their drift bounds (windows.py _accumulate). */
static void accumulate(const Ring *r, double *row, const double *totals, const double *magnitudes, int64_t length,
                       int sign) {
    for (int s = 0; s < r->n_sums; s++) {
        row[SUMS + s] = sign > 0 ? row[SUMS + s] + totals[s] : row[SUMS + s] - totals[s];
        row[DRIFTS + s] += ROUNDOFF * (((double)length + 2.0) * magnitudes[s] + fabs(row[SUMS + s]));
    }
}

static double larger(double a, double b) { return a > b ? a : b; }

/* windows.py _RingWindowState._drifted, for one key. */
static int drifted(const Ring *r, const double *row, int64_t count, int64_t run) {
    Sums k = sums_of(r, row);
    double n = (double)count, *t = k.total, *e = k.bound;
    int varying = run < count, bad = 0;
    if (k.kept[SX]) {
        double magnitude = MAGNITUDE_SHARE * t[SA], sums = fabs(n * row[CENTRE] + t[SX]);
        bad |= !(e[SX] <= DRIFT * larger(sums, magnitude)) || !(e[SA] <= DRIFT * t[SA]);
    }
    if (k.kept[SXX] && count > 1) {
        double spread = t[SXX] - t[SX] * t[SX] / n;
        double spread_bound = e[SXX] + 2.0 * fabs(t[SX]) * e[SX] / n;
        double n_std = n * sqrt(larger(spread, 0.0) / (n - 1.0));
        bad |= !(spread_bound <= DRIFT * spread) || !(e[SX] <= DRIFT * n_std);
    }
    bad &= varying;
    if (k.kept[SQ] && t[SN] > 0) {
        double volume = t[SQ];
        bad |= !(e[SQ] <= DRIFT * volume);
        if (k.kept[SXQ] && varying) {
            double vwap = row[CENTRE] + t[SXQ] / volume;
            double vwap_bound = (e[SXQ] + fabs(t[SXQ]) * e[SQ] / volume) / volume;
            bad |= !(vwap_bound <= DRIFT * larger(fabs(vwap), MAGNITUDE_SHARE * t[SA] / n));
        }
    }
    return bad;
}

static double stat_value(const Ring *r, const Sums *k, int64_t code, const double *row, int64_t count, int64_t run,
                         int64_t head_pos, double last) {
    double n = (double)count, centre = row[CENTRE], var, std;
    const double *t = k->total;
    int constant = run >= count;
    switch (code) {
    case ST_COUNT: return n;
    case ST_FIRST: return r->p[head_pos];
    case ST_LAST: return last;
    case ST_SUM: return constant ? n * last : n * centre + t[SX];
    case ST_MEAN: return constant ? last : centre + t[SX] / n;
    case ST_VOLUME: return t[SN] > 0 ? t[SQ] : 0.0;
    case ST_VWAP: return t[SN] == 0 ? NAN : constant ? last : centre + t[SXQ] / t[SQ];
    case ST_MIN: return r->fmin[head_pos] < row[BACK_MIN] ? r->fmin[head_pos] : row[BACK_MIN];
    case ST_MAX: return r->fmax[head_pos] > row[BACK_MAX] ? r->fmax[head_pos] : row[BACK_MAX];
    default: break;
    }
    if (count < 2) return NAN;
    var = constant ? 0.0 : larger(t[SXX] - t[SX] * t[SX] / n, 0.0) / (n - 1.0);
    if (code == ST_VAR) return var;
    std = sqrt(var);
    if (code == ST_STD) return std;
    return std > 0 ? ((last - centre) - t[SX] / n) / std : NAN;
}

/* Rebuild a key from its whole window [lo, hi): fresh centre, exact sums, new front extremes. */
static void flip(const Ring *r, double *row, int64_t off, int64_t mask, int64_t lo, int64_t hi) {
    double centre = r->p[off + ((hi - 1) & mask)], totals[MAX_SUMS] = {0}, magnitudes[MAX_SUMS] = {0};
    row[CENTRE] = centre;
    for (int64_t i = lo; i < hi; i++) {
        int64_t pos = off + (i & mask);
        add_terms(totals, magnitudes, r->kinds, r->n_sums, r->p[pos], centre, r->q[pos]);
    }
    for (int s = 0; s < r->n_sums; s++) {
        row[SUMS + s] = totals[s];
        row[DRIFTS + s] = 0.0;
    }
    if (r->extremes) {
        double low = INFINITY, high = -INFINITY;
        for (int64_t i = hi - 1; i >= lo; i--) {
            int64_t pos = off + (i & mask);
            double v = r->p[pos];
            low = v < low ? v : low;
            high = v > high ? v : high;
            r->fmin[pos] = low;
            r->fmax[pos] = high;
        }
        row[BACK_MIN] = INFINITY;
        row[BACK_MAX] = -INFINITY;
    }
}

PyDoc_STRVAR(ring_update_doc,
             "ring_update(ints, floats, p, q, t, front_min, front_max, keys, starts, bt, bp, bq, kinds, codes, out, "
             "scalars, is_time, size, extremes, first) -> index\n\n"
             "Apply keys[first:] of a grouped batch to a time or count window; write the stats (one row per code).\n"
             "scalars = [pool used, pool size, live ticks, pool size needed]. Returns -1 when done, or the key index\n"
             "at which the pool ran out of room (scalars[3] says how much is needed; grow it and call again).");

static PyObject *ring_update(PyObject *self, PyObject *args) {
    PyObject *o[16];
    Buf b[16] = {0};
    int is_time, extremes;
    long long size;
    Py_ssize_t first;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOOOOiLin", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8],
                          &o[9], &o[10], &o[11], &o[12], &o[13], &o[14], &o[15], &is_time, &size, &extremes, &first))
        return NULL;
    static const int writable[16] = {1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1};
    for (int i = 0; i < 16; i++) {
        if (get_buffer(o[i], &b[i], 8, writable[i]) < 0) {
            release(b, 16);
            return NULL;
        }
    }
    const int64_t *keys = I64(b[7]), *starts = I64(b[8]), *bt = I64(b[9]), *codes = I64(b[13]);
    const double *bp = F64(b[10]), *bq = F64(b[11]);
    double *out = F64(b[14]);
    int64_t *scalars = I64(b[15]);
    Py_ssize_t groups = LEN(b[7], int64_t), n_codes = LEN(b[13], int64_t);
    Ring r = {I64(b[0]), F64(b[1]), F64(b[2]), F64(b[3]), F64(b[5]), F64(b[6]), I64(b[4]),
              I64(b[12]), (int)LEN(b[12], int64_t), is_time, extremes, size};
    int64_t used = scalars[0], pool_size = scalars[1], live = scalars[2];
    Py_ssize_t rows = LEN(b[0], int64_t) / N_INT, stop = -1;
    int valid = LEN(b[0], int64_t) == rows * N_INT && LEN(b[1], double) == rows * N_FLOAT && LEN(b[15], int64_t) == 4 &&
                LEN(b[2], double) >= pool_size && LEN(b[3], double) >= pool_size && LEN(b[14], double) == n_codes * groups;
    for (Py_ssize_t g = 0; valid && g < groups; g++) valid = keys[g] >= 0 && keys[g] < rows;
    if (!valid) {
        release(b, 16);
        PyErr_SetString(PyExc_ValueError, "ring_update: tables, pool or output do not match the batch");
        return NULL;
    }
    for (Py_ssize_t g = first; g < groups; g++) {
        int64_t *state = r.ints + keys[g] * N_INT;
        double *row = r.floats + keys[g] * N_FLOAT;
        int64_t off = state[OFF], cap = state[CAP], head = state[HEAD], split = state[SPLIT], end = state[END];
        int64_t b0 = starts[g], b_end = starts[g + 1], b1 = b0, mask = cap - 1, threshold = 0, new_head;
        double last = bp[b_end - 1];
        /* Batch ticks already out of the window at the key's newest tick are never stored. */
        if (is_time) {
            threshold = bt[b_end - 1] - size;
            while (bt[b1] <= threshold) b1++;
        } else if (b_end - b0 > size) {
            b1 = b_end - size;
        }
        int64_t new_end = end + (b_end - b1);
        if (is_time) {
            new_head = head;
            while (new_head < end && r.t[off + (new_head & mask)] <= threshold) new_head++;
        } else {
            new_head = new_end - size > head ? new_end - size : head;
        }
        int64_t new_cap = 0;
        if (new_end - new_head > cap) {
            new_cap = next_pow2(2 * (new_end - new_head) > MIN_CAP ? 2 * (new_end - new_head) : MIN_CAP);
            if (used + new_cap > pool_size) {
                scalars[3] = used + new_cap;
                stop = g;
                break;
            }
        }
        int is_flip = new_head >= split;
        if (r.n_sums && !is_flip && new_head > head) {
            double totals[MAX_SUMS] = {0}, magnitudes[MAX_SUMS] = {0};
            for (int64_t i = head; i < new_head; i++) {
                int64_t pos = off + (i & mask);
                add_terms(totals, magnitudes, r.kinds, r.n_sums, r.p[pos], row[CENTRE], r.q[pos]);
            }
            accumulate(&r, row, totals, magnitudes, new_head - head, -1);
        }
        if (new_cap) {
            int64_t new_mask = new_cap - 1;
            for (int64_t i = new_head; i < end; i++) {
                int64_t from = off + (i & mask), to = used + (i & new_mask);
                r.p[to] = r.p[from];
                r.q[to] = r.q[from];
                if (is_time) r.t[to] = r.t[from];
                if (extremes) {
                    r.fmin[to] = r.fmin[from];
                    r.fmax[to] = r.fmax[from];
                }
            }
            off = used;
            used += new_cap;
            cap = new_cap;
            mask = new_mask;
        }
        double totals[MAX_SUMS] = {0}, magnitudes[MAX_SUMS] = {0}, low = INFINITY, high = -INFINITY;
        int64_t run = state[RUN];
        for (int64_t i = b1; i < b_end; i++) {
            int64_t pos = off + ((end + i - b1) & mask);
            r.p[pos] = bp[i];
            r.q[pos] = bq[i];
            if (is_time) r.t[pos] = bt[i];
            run = bp[i] == row[LAST] ? run + 1 : 1;
            row[LAST] = bp[i];
            if (!is_flip) {
                add_terms(totals, magnitudes, r.kinds, r.n_sums, bp[i], row[CENTRE], bq[i]);
                low = bp[i] < low ? bp[i] : low;
                high = bp[i] > high ? bp[i] : high;
            }
        }
        if (is_flip) {
            flip(&r, row, off, mask, new_head, new_end);
            split = new_end;
        } else {
            if (r.n_sums) accumulate(&r, row, totals, magnitudes, b_end - b1, 1);
            if (extremes) {
                row[BACK_MIN] = low < row[BACK_MIN] ? low : row[BACK_MIN];
                row[BACK_MAX] = high > row[BACK_MAX] ? high : row[BACK_MAX];
            }
        }
        if (drifted(&r, row, new_end - new_head, run)) {
            flip(&r, row, off, mask, new_head, new_end);
            split = new_end;
        }
        live += (new_end - new_head) - (end - head);
        state[OFF] = off;
        state[CAP] = cap;
        state[HEAD] = new_head;
        state[SPLIT] = split;
        state[END] = new_end;
        state[RUN] = run;
        int64_t head_pos = off + (new_head & mask);
        Sums sums = sums_of(&r, row);
        for (Py_ssize_t c = 0; c < n_codes; c++) {
            out[c * groups + g] = stat_value(&r, &sums, codes[c], row, new_end - new_head, run, head_pos, last);
        }
    }
    scalars[0] = used;
    scalars[2] = live;
    release(b, 16);
    return PyLong_FromSsize_t(stop);
}

PyDoc_STRVAR(ewma_update_doc,
             "ewma_update(num, den, t_last, keys, starts, bt, bp, half_life, out)\n\n"
             "Decay each key's weighted sums to its newest tick, add the batch's ticks, write the EWMA.");

static PyObject *ewma_update(PyObject *self, PyObject *args) {
    PyObject *o[8];
    Buf b[8] = {0};
    double half_life;
    if (!PyArg_ParseTuple(args, "OOOOOOOdO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &half_life, &o[7]))
        return NULL;
    static const int writable[8] = {1, 1, 1, 0, 0, 0, 0, 1};
    for (int i = 0; i < 8; i++) {
        if (get_buffer(o[i], &b[i], 8, writable[i]) < 0) {
            release(b, 8);
            return NULL;
        }
    }
    double *num = F64(b[0]), *den = F64(b[1]), *out = F64(b[7]);
    int64_t *t_last = I64(b[2]);
    const int64_t *keys = I64(b[3]), *starts = I64(b[4]), *bt = I64(b[5]);
    const double *bp = F64(b[6]);
    Py_ssize_t groups = LEN(b[3], int64_t);
    for (Py_ssize_t g = 0; g < groups; g++) {
        int64_t key = keys[g], newest = bt[starts[g + 1] - 1];
        double weighted = 0, weights = 0;
        for (int64_t i = starts[g]; i < starts[g + 1]; i++) {
            double weight = exp2((double)(bt[i] - newest) / half_life);
            weighted += weight * bp[i];
            weights += weight;
        }
        double decay = den[key] == 0 ? 0.0 : exp2((double)(t_last[key] - newest) / half_life);
        num[key] = num[key] * decay + weighted;
        den[key] = den[key] * decay + weights;
        t_last[key] = newest;
        out[g] = num[key] / den[key];
    }
    release(b, 8);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"accept", accept, METH_VARARGS, accept_doc},
    {"ring_update", ring_update, METH_VARARGS, ring_update_doc},
    {"ewma_update", ewma_update, METH_VARARGS, ewma_update_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "streamd._kernel", "Compiled kernel of streamd.windows.",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&module); }
