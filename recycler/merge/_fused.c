/* recycler.merge._fused: the CPU kernel of every merge that is one linear combination
 * per tensor (linear, task arithmetic, weight schemes): out = Σ c_i x_i, accumulated
 * in fp32, cast once, with a test for NaN and inf on the way out.
 *
 * Why C: the same loop written as PyTorch ops needs a widening copy per input, an
 * add per input and a cast, each a pass over a chunk plus ~10 µs of dispatch; here
 * each element is loaded once, combined in registers and stored once, so the loop
 * runs near memory speed (see experiments/bench_merge.py).
 *
 *   combine(out_addr, out_dtype, in_addrs, in_dtypes, coeffs, start, stop) -> bool
 *       memory to memory, over elements [start, stop) of each array;
 *   combine_files(out_fd, out_offset, out_dtype, in_fds, in_offsets, in_dtypes,
 *                 coeffs, start, stop, scratch) -> bool
 *       file to file: reads each input's elements with pread(2) into `scratch`,
 *       combines them there and writes the result with pwrite(2), so a merge
 *       streams from the page cache without mapping, allocating or holding a tensor.
 *   gram(in_addrs, in_dtypes, start, stop) -> tuple
 *   gram_files(in_fds, in_offsets, in_dtypes, start, stop, scratch) -> tuple
 *       the inner products Σ x_i x_j (i <= j, row by row) of elements [start, stop)
 *       of the inputs (in memory, or read from files like combine_files; the same
 *       bits either way), accumulated in fp64: the
 *       norms and angle of a merge whose coefficients depend on them (SLERP).
 *
 * combine and combine_files return False when an output element is NaN or inf (a non-finite input, or an
 * overflow of the cast), release the GIL, and keep no state: callers run them on
 * several threads over disjoint ranges. Dtype codes: 0 float32, 1 bfloat16, 2 float16.
 *
 * Every build gives the same bits: floating-point contraction (FMA) is off and the
 * order of operations per element depends only on the inputs' order and dtypes, not
 * on the chunking or on which instruction set the CPU dispatch below picks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

/* Elements combined per pass: a 4 KB fp32 accumulator stays in L1. */
#define BLOCK 1024
/* Elements read per input per pread in combine_files: 128 KB of bf16, 256 KB of
 * fp32, so every input's chunk and the output's stay in L2 between read and write. */
#define FILE_STEP (1 << 16)

#if defined(__FLT16_MAX__)
#define HAVE_F16 1
typedef _Float16 f16_t;
#else
#define HAVE_F16 0
#endif

/* Compiled three times on x86-64 with GCC (AVX-512, AVX2, baseline); the loader picks
 * the best the CPU runs. Elsewhere the compiler's default target. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DISPATCH
#endif

static inline float load(const void *p, int dtype, size_t j) {
    if (dtype == DT_BF16) {
        uint32_t u = (uint32_t)((const uint16_t *)p)[j] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
#if HAVE_F16
    if (dtype == DT_F16) return (float)((const f16_t *)p)[j];
#endif
    return ((const float *)p)[j];
}

/* Round to nearest even, as PyTorch's cast does (NaN stays a quiet NaN). */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : (uint16_t)rounded;
}

/* out[lo..lo+n) = Σ_i c_i in_i[lo..lo+n); returns 1 when every output is finite.
 * Inputs go four (or two) to a pass when they share a dtype, which halves or
 * quarters the accumulator traffic; the grouping depends only on the dtypes. */
DISPATCH
static int combine_block(void *out, int out_dtype, void *const *ins, const int *dtypes, const float *coeffs, int k, size_t lo, size_t n) {
    float acc[BLOCK];
    int i = 0;
    while (i < k) {
        const int first = i == 0;
        if (i + 3 < k && dtypes[i] == DT_BF16 && dtypes[i + 1] == DT_BF16 && dtypes[i + 2] == DT_BF16 && dtypes[i + 3] == DT_BF16) {
            const uint16_t *a = (const uint16_t *)ins[i] + lo, *b = (const uint16_t *)ins[i + 1] + lo;
            const uint16_t *c = (const uint16_t *)ins[i + 2] + lo, *d = (const uint16_t *)ins[i + 3] + lo;
            const float ca = coeffs[i], cb = coeffs[i + 1], cc = coeffs[i + 2], cd = coeffs[i + 3];
            for (size_t j = 0; j < n; j++) {
                float s = (ca * load(a, DT_BF16, j) + cb * load(b, DT_BF16, j)) + (cc * load(c, DT_BF16, j) + cd * load(d, DT_BF16, j));
                acc[j] = first ? s : acc[j] + s;
            }
            i += 4;
        } else if (i + 1 < k && dtypes[i] == DT_BF16 && dtypes[i + 1] == DT_BF16) {
            const uint16_t *a = (const uint16_t *)ins[i] + lo, *b = (const uint16_t *)ins[i + 1] + lo;
            const float ca = coeffs[i], cb = coeffs[i + 1];
            for (size_t j = 0; j < n; j++) {
                float s = ca * load(a, DT_BF16, j) + cb * load(b, DT_BF16, j);
                acc[j] = first ? s : acc[j] + s;
            }
            i += 2;
        } else {
            const float c = coeffs[i];
            const char *p = ins[i];
            switch (dtypes[i]) {
            case DT_BF16:
                for (size_t j = 0; j < n; j++) {
                    float s = c * load(p, DT_BF16, lo + j);
                    acc[j] = first ? s : acc[j] + s;
                }
                break;
#if HAVE_F16
            case DT_F16:
                for (size_t j = 0; j < n; j++) {
                    float s = c * load(p, DT_F16, lo + j);
                    acc[j] = first ? s : acc[j] + s;
                }
                break;
#endif
            default:
                for (size_t j = 0; j < n; j++) {
                    float s = c * load(p, DT_F32, lo + j);
                    acc[j] = first ? s : acc[j] + s;
                }
            }
            i += 1;
        }
    }
    uint32_t bad = 0;
    if (out_dtype == DT_BF16) {
        uint16_t *dst = (uint16_t *)out + lo;
        for (size_t j = 0; j < n; j++) {
            uint16_t o = to_bf16(acc[j]);
            dst[j] = o;
            bad |= (o & 0x7f80u) == 0x7f80u;
        }
#if HAVE_F16
    } else if (out_dtype == DT_F16) {
        f16_t *dst = (f16_t *)out + lo;
        for (size_t j = 0; j < n; j++) {
            f16_t o = (f16_t)acc[j];
            uint16_t bits;
            memcpy(&bits, &o, 2);
            dst[j] = o;
            bad |= (bits & 0x7c00u) == 0x7c00u;
        }
#endif
    } else {
        float *dst = (float *)out + lo;
        for (size_t j = 0; j < n; j++) {
            uint32_t bits;
            memcpy(&bits, &acc[j], 4);
            dst[j] = acc[j];
            bad |= (bits & 0x7f800000u) == 0x7f800000u;
        }
    }
    return !bad;
}

static int combine_range(void *out, int out_dtype, void *const *ins, const int *dtypes, const float *coeffs, int k, size_t start, size_t stop) {
    int finite = 1;
    for (size_t lo = start; lo < stop; lo += BLOCK)
        finite &= combine_block(out, out_dtype, ins, dtypes, coeffs, k, lo, stop - lo < BLOCK ? stop - lo : BLOCK);
    return finite;
}

static size_t itemsize(int dtype) { return dtype == DT_F32 ? 4 : 2; }

/* ------------------------------------------------------------------ argument parsing */

typedef struct {
    int k;
    int *dtypes;
    float *coeffs;
    long long *values; /* addresses or file descriptors */
    long long *offsets; /* combine_files only */
} Inputs;

static void inputs_free(Inputs *in) {
    PyMem_Free(in->dtypes);
    PyMem_Free(in->coeffs);
    PyMem_Free(in->values);
    PyMem_Free(in->offsets);
}

static int check_dtype(int dtype) {
    if (dtype == DT_F32 || dtype == DT_BF16 || (HAVE_F16 && dtype == DT_F16)) return 0;
    PyErr_Format(PyExc_ValueError, "unsupported dtype code %d", dtype);
    return -1;
}

/* Fills `in` from same-length sequences; `offsets` and `coeffs` may be NULL. */
static int inputs_parse(Inputs *in, PyObject *values, PyObject *offsets, PyObject *dtypes, PyObject *coeffs) {
    memset(in, 0, sizeof(*in));
    PyObject *seqs[4] = {values, offsets, dtypes, coeffs};
    PyObject *fast[4] = {NULL, NULL, NULL, NULL};
    int rc = -1;
    for (int s = 0; s < 4; s++) {
        if (seqs[s] == NULL) continue;
        fast[s] = PySequence_Fast(seqs[s], "inputs must be sequences");
        if (fast[s] == NULL) goto done;
    }
    Py_ssize_t k = PySequence_Fast_GET_SIZE(fast[0]);
    for (int s = 1; s < 4; s++) {
        if (fast[s] != NULL && PySequence_Fast_GET_SIZE(fast[s]) != k) {
            PyErr_SetString(PyExc_ValueError, "input sequences differ in length");
            goto done;
        }
    }
    if (k < 1 || k > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "need at least one input");
        goto done;
    }
    in->k = (int)k;
    in->dtypes = PyMem_Calloc((size_t)k, sizeof(int));
    in->coeffs = PyMem_Calloc((size_t)k, sizeof(float));
    in->values = PyMem_Calloc((size_t)k, sizeof(long long));
    in->offsets = PyMem_Calloc((size_t)k, sizeof(long long));
    if (!in->dtypes || !in->coeffs || !in->values || !in->offsets) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        in->values[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast[0], i));
        if (fast[1] != NULL) in->offsets[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast[1], i));
        in->dtypes[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(fast[2], i));
        if (fast[3] != NULL) in->coeffs[i] = (float)PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast[3], i));
        if (PyErr_Occurred() || check_dtype(in->dtypes[i]) < 0) goto done;
    }
    rc = 0;
done:
    for (int s = 0; s < 4; s++) Py_XDECREF(fast[s]);
    if (rc < 0) inputs_free(in);
    return rc;
}

/* ------------------------------------------------------------------ combine */

static PyObject *py_combine(PyObject *self, PyObject *args) {
    unsigned long long out_addr;
    int out_dtype;
    PyObject *addrs, *dtypes, *coeffs;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "KiOOOnn", &out_addr, &out_dtype, &addrs, &dtypes, &coeffs, &start, &stop)) return NULL;
    if (check_dtype(out_dtype) < 0) return NULL;
    if (start < 0 || stop < start) return PyErr_Format(PyExc_ValueError, "bad range [%zd, %zd)", start, stop);
    Inputs in;
    if (inputs_parse(&in, addrs, NULL, dtypes, coeffs) < 0) return NULL;
    void **ins = PyMem_Calloc((size_t)in.k, sizeof(void *));
    if (ins == NULL) {
        inputs_free(&in);
        return PyErr_NoMemory();
    }
    for (int i = 0; i < in.k; i++) ins[i] = (void *)(uintptr_t)in.values[i];
    int finite;
    Py_BEGIN_ALLOW_THREADS
    finite = combine_range((void *)(uintptr_t)out_addr, out_dtype, ins, in.dtypes, in.coeffs, in.k, (size_t)start, (size_t)stop);
    Py_END_ALLOW_THREADS
    PyMem_Free(ins);
    inputs_free(&in);
    return PyBool_FromLong(finite);
}

/* ------------------------------------------------------------------ combine_files */

/* 0, or an errno value (-1: the file ended before the requested bytes). */
static int pread_full(int fd, char *buf, size_t len, off_t off) {
    while (len > 0) {
        ssize_t got = pread(fd, buf, len, off);
        if (got < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (got == 0) return -1;
        buf += got;
        len -= (size_t)got;
        off += got;
    }
    return 0;
}

static int pwrite_full(int fd, const char *buf, size_t len, off_t off) {
    while (len > 0) {
        ssize_t put = pwrite(fd, buf, len, off);
        if (put < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        buf += put;
        len -= (size_t)put;
        off += put;
    }
    return 0;
}

/* Elements [lo, lo + n) of every input tensor into its buffer; `*which` names the input
   read last (the one that failed, on an error). 0, -1 (a file ends early) or an errno. */
static int read_chunk(const Inputs *in, void *const *ins, size_t lo, size_t n, int *which) {
    int err = 0;
    for (int i = 0; i < in->k && err == 0; i++) {
        size_t width = itemsize(in->dtypes[i]);
        err = pread_full((int)in->values[i], ins[i], n * width, (off_t)(in->offsets[i] + (long long)(lo * width)));
        *which = i;
    }
    return err;
}

static PyObject *py_combine_files(PyObject *self, PyObject *args) {
    int out_fd, out_dtype;
    long long out_offset;
    PyObject *fds, *offsets, *dtypes, *coeffs;
    Py_ssize_t start, stop;
    Py_buffer scratch;
    if (!PyArg_ParseTuple(args, "iLiOOOOnnw*", &out_fd, &out_offset, &out_dtype, &fds, &offsets, &dtypes, &coeffs, &start, &stop, &scratch)) return NULL;
    PyObject *result = NULL;
    Inputs in;
    if (check_dtype(out_dtype) < 0) goto release_scratch;
    if (start < 0 || stop < start || out_offset < 0) {
        PyErr_Format(PyExc_ValueError, "bad range [%zd, %zd)", start, stop);
        goto release_scratch;
    }
    if (inputs_parse(&in, fds, offsets, dtypes, coeffs) < 0) goto release_scratch;
    size_t need = ((size_t)in.k + 1) * FILE_STEP * 4;
    void **ins = PyMem_Calloc((size_t)in.k, sizeof(void *));
    if (ins == NULL) {
        PyErr_NoMemory();
        goto release_inputs;
    }
    if ((size_t)scratch.len < need) {
        PyErr_Format(PyExc_ValueError, "scratch buffer too small: %zd bytes, need %zu", scratch.len, need);
        goto release_ins;
    }
    char *base = scratch.buf;
    for (int i = 0; i < in.k; i++) ins[i] = base + (size_t)i * FILE_STEP * 4;
    char *out = base + (size_t)in.k * FILE_STEP * 4;
    int finite = 1, err = 0, which = 0;
    Py_BEGIN_ALLOW_THREADS
    for (size_t lo = (size_t)start; lo < (size_t)stop && err == 0; lo += FILE_STEP) {
        size_t n = (size_t)stop - lo < FILE_STEP ? (size_t)stop - lo : FILE_STEP;
        err = read_chunk(&in, ins, lo, n, &which);
        if (err != 0) break;
        finite &= combine_range(out, out_dtype, ins, in.dtypes, in.coeffs, in.k, 0, n);
        size_t width = itemsize(out_dtype);
        err = pwrite_full(out_fd, out, n * width, (off_t)(out_offset + (long long)(lo * width)));
        which = -1;
    }
    Py_END_ALLOW_THREADS
    if (err == -1) {
        /* OSError(errno, message, filename): the filename slot carries the input's index. */
        PyErr_SetObject(PyExc_OSError, Py_BuildValue("(isi)", EIO, "the file ends before the tensor does", which));
    } else if (err != 0) {
        PyErr_SetObject(PyExc_OSError, Py_BuildValue("(isi)", err, strerror(err), which));
    } else {
        result = PyBool_FromLong(finite);
    }
release_ins:
    PyMem_Free(ins);
release_inputs:
    inputs_free(&in);
release_scratch:
    PyBuffer_Release(&scratch);
    return result;
}

/* ------------------------------------------------------------------ gram_files */

/* Partial sums per product: GRAM_LANES of them, element j going to lane j % GRAM_LANES,
 * so the additions of different lanes do not wait on each other (and vectorise) while
 * the order of every sum stays fixed by the code: the same bits on every build. */
#define GRAM_LANES 8
#define GRAM_MAX 4 /* inputs at most: 10 products */

/* dst[0..n) = src[lo..lo+n) widened to fp32 (exact), one loop per dtype so it vectorises. */
DISPATCH
static void widen(float *dst, const void *src, int dtype, size_t lo, size_t n) {
    switch (dtype) {
    case DT_BF16:
        for (size_t j = 0; j < n; j++) dst[j] = load(src, DT_BF16, lo + j);
        break;
#if HAVE_F16
    case DT_F16:
        for (size_t j = 0; j < n; j++) dst[j] = load(src, DT_F16, lo + j);
        break;
#endif
    default:
        for (size_t j = 0; j < n; j++) dst[j] = load(src, DT_F32, lo + j);
    }
}

/* Adds to `sums` the products of elements [lo, lo + n) of the inputs, widened a BLOCK at
 * a time; element j of the call goes to lane j % GRAM_LANES, whose sum is added into
 * `sums` at the end. Callers cut their ranges into the same FILE_STEP chunks (gram and
 * gram_files alike), so memory and files give the same bits. */
DISPATCH
static void gram_block(double *sums, void *const *ins, const int *dtypes, int k, size_t lo, size_t n) {
    double lanes[GRAM_MAX * (GRAM_MAX + 1) / 2][GRAM_LANES] = {{0}};
    float wide[GRAM_MAX][BLOCK];
    for (size_t at = 0; at < n; at += BLOCK) { /* BLOCK is a multiple of GRAM_LANES */
        size_t m = n - at < BLOCK ? n - at : BLOCK;
        for (int a = 0; a < k; a++) widen(wide[a], ins[a], dtypes[a], lo + at, m);
        size_t p = 0;
        for (int a = 0; a < k; a++) {
            for (int b = a; b < k; b++, p++) {
                const float *x = wide[a], *y = wide[b];
                double *lane = lanes[p];
                size_t j = 0;
                for (; j + GRAM_LANES <= m; j += GRAM_LANES)
                    for (int l = 0; l < GRAM_LANES; l++) lane[l] += (double)x[j + l] * (double)y[j + l];
                for (; j < m; j++) lane[j % GRAM_LANES] += (double)x[j] * (double)y[j];
            }
        }
    }
    for (int p = 0; p < k * (k + 1) / 2; p++) {
        double total = 0.0;
        for (int l = 0; l < GRAM_LANES; l++) total += lanes[p][l];
        sums[p] += total;
    }
}

static PyObject *gram_tuple(const double *sums, int k) {
    int n_sums = k * (k + 1) / 2;
    PyObject *result = PyTuple_New(n_sums);
    for (int p = 0; result != NULL && p < n_sums; p++) {
        PyObject *v = PyFloat_FromDouble(sums[p]);
        if (v == NULL) {
            Py_CLEAR(result);
            break;
        }
        PyTuple_SET_ITEM(result, p, v);
    }
    return result;
}

static PyObject *py_gram(PyObject *self, PyObject *args) {
    PyObject *addrs, *dtypes;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "OOnn", &addrs, &dtypes, &start, &stop)) return NULL;
    if (start < 0 || stop < start) return PyErr_Format(PyExc_ValueError, "bad range [%zd, %zd)", start, stop);
    Inputs in;
    if (inputs_parse(&in, addrs, NULL, dtypes, NULL) < 0) return NULL;
    if (in.k > GRAM_MAX) {
        inputs_free(&in);
        return PyErr_Format(PyExc_ValueError, "gram takes at most %d inputs, got %d", GRAM_MAX, in.k);
    }
    void *ins[GRAM_MAX];
    for (int i = 0; i < in.k; i++) ins[i] = (void *)(uintptr_t)in.values[i];
    double sums[GRAM_MAX * (GRAM_MAX + 1) / 2] = {0};
    Py_BEGIN_ALLOW_THREADS
    for (size_t lo = (size_t)start; lo < (size_t)stop; lo += FILE_STEP)
        gram_block(sums, ins, in.dtypes, in.k, lo, (size_t)stop - lo < FILE_STEP ? (size_t)stop - lo : FILE_STEP);
    Py_END_ALLOW_THREADS
    PyObject *result = gram_tuple(sums, in.k);
    inputs_free(&in);
    return result;
}

static PyObject *py_gram_files(PyObject *self, PyObject *args) {
    PyObject *fds, *offsets, *dtypes;
    Py_ssize_t start, stop;
    Py_buffer scratch;
    if (!PyArg_ParseTuple(args, "OOOnnw*", &fds, &offsets, &dtypes, &start, &stop, &scratch)) return NULL;
    PyObject *result = NULL;
    Inputs in;
    if (start < 0 || stop < start) {
        PyErr_Format(PyExc_ValueError, "bad range [%zd, %zd)", start, stop);
        goto release_scratch;
    }
    if (inputs_parse(&in, fds, offsets, dtypes, NULL) < 0) goto release_scratch;
    if (in.k > GRAM_MAX) {
        PyErr_Format(PyExc_ValueError, "gram_files takes at most %d inputs, got %d", GRAM_MAX, in.k);
        goto release_inputs;
    }
    if ((size_t)scratch.len < (size_t)in.k * FILE_STEP * 4) {
        PyErr_Format(PyExc_ValueError, "scratch buffer too small: %zd bytes", scratch.len);
        goto release_inputs;
    }
    void *ins[GRAM_MAX];
    char *base = scratch.buf;
    for (int i = 0; i < in.k; i++) ins[i] = base + (size_t)i * FILE_STEP * 4;
    double sums[GRAM_MAX * (GRAM_MAX + 1) / 2] = {0};
    int err = 0, which = 0;
    Py_BEGIN_ALLOW_THREADS
    for (size_t lo = (size_t)start; lo < (size_t)stop && err == 0; lo += FILE_STEP) {
        size_t n = (size_t)stop - lo < FILE_STEP ? (size_t)stop - lo : FILE_STEP;
        err = read_chunk(&in, ins, lo, n, &which);
        if (err == 0) gram_block(sums, ins, in.dtypes, in.k, 0, n);
    }
    Py_END_ALLOW_THREADS
    if (err == -1) {
        PyErr_SetObject(PyExc_OSError, Py_BuildValue("(isi)", EIO, "the file ends before the tensor does", which));
    } else if (err != 0) {
        PyErr_SetObject(PyExc_OSError, Py_BuildValue("(isi)", err, strerror(err), which));
    } else {
        result = gram_tuple(sums, in.k);
    }
release_inputs:
    inputs_free(&in);
release_scratch:
    PyBuffer_Release(&scratch);
    return result;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
    {"combine", py_combine, METH_VARARGS,
     "combine(out_addr, out_dtype, in_addrs, in_dtypes, coeffs, start, stop) -> bool: "
     "out[start:stop] = sum_i coeffs[i] * in_i[start:stop] in fp32; False if an output is NaN or inf."},
    {"combine_files", py_combine_files, METH_VARARGS,
     "combine_files(out_fd, out_offset, out_dtype, in_fds, in_offsets, in_dtypes, coeffs, start, stop, scratch) -> bool: "
     "combine() from files to a file with pread/pwrite; scratch holds (len(in_fds) + 1) * FILE_STEP * 4 bytes. "
     "An I/O error raises OSError whose filename is the input's index (-1: the output)."},
    {"gram", py_gram, METH_VARARGS,
     "gram(in_addrs, in_dtypes, start, stop) -> tuple: "
     "sum_j x_a[j] * x_b[j] over [start, stop) for a <= b (row by row), in fp64."},
    {"gram_files", py_gram_files, METH_VARARGS,
     "gram_files(in_fds, in_offsets, in_dtypes, start, stop, scratch) -> tuple: "
     "sum_j x_a[j] * x_b[j] over [start, stop) for a <= b (row by row), in fp64, read from files "
     "with pread; scratch holds len(in_fds) * FILE_STEP * 4 bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", "Fused fp32-accumulating linear combination kernels.", -1, methods};

PyMODINIT_FUNC PyInit__fused(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "FILE_STEP", FILE_STEP) < 0 || PyModule_AddIntConstant(m, "HAVE_F16", HAVE_F16) < 0 ||
        PyModule_AddIntConstant(m, "F32", DT_F32) < 0 || PyModule_AddIntConstant(m, "BF16", DT_BF16) < 0 ||
        PyModule_AddIntConstant(m, "F16", DT_F16) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
