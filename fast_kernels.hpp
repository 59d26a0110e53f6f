// Kernels of fast_layers.py in float and double: direct convolution (stride 1) for Convolution, and
// ReLU. fast_kernels.pyx is their Python face; layers.py holds the textbook versions they must equal.
//
// The textbook Convolution copies every input pixel k*k times into the im2col matrix and hands it to
// a matrix product. Here each image's pixels are copied only k times, into "shifted planes": for
// channel c and kernel column j,
//
//     shifted[c][j][r * OW + xo] = x_padded[c][r][xo + j],   r < H + 2*pad (padded rows), xo < OW,
//
// i.e. x shifted left by j and cut to the output width. Number the output pixels p = y * OW + xo:
// kernel tap (c, i, j) then reads plane (c, j) at p + i * OW, the same offset for every pixel. So
//
//     out[f][p] = bias[f] + sum over taps (c, i, j) of  w[f][c][i][j] * shifted[c][j][p + i * OW]
//
// is a sum of whole planes times scalars, and the kernels run it in vector registers, a few
// filters times a row of consecutive pixels at a time ("register blocking"): each vector of pixels
// loaded from cache feeds several multiply-adds. The input gradient is the same sum over the
// output gradient with the kernel flipped (fast_layers.py), so `forward` serves both. The weight
// gradient sums products of planes, dw[f][c][i][j] = sum over p of g[f][p] * shifted[c][j][p + i*OW].
//
// Vectors are GCC/clang vector extensions. The convolution is compiled twice: for AVX2 + FMA with
// vectors of 32 bytes (8 floats or 4 doubles), and a plain build with vectors of 16 bytes, the width
// every x86-64 (SSE2) and ARM64 (NEON) CPU has. The AVX2 build runs where the CPU has those
// instructions (asked at run time), so a module built on one x86 machine runs on any other; no
// -march=native. (32-byte vectors in the plain build ran 30x slower: without AVX they live in memory.)
// Other compilers (MSVC) get a plain struct instead, and so does a build with FAST_KERNELS_PORTABLE
// defined (to try that version with GCC): correct, but 5-18x slower than the vector build with GCC.
#ifndef FAST_KERNELS_HPP
#define FAST_KERNELS_HPP

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <vector>

namespace kernels {

#if defined(__GNUC__)
#define KERNEL_INLINE inline __attribute__((always_inline))
#else
#define KERNEL_INLINE inline
#endif

#if defined(__GNUC__) && !defined(FAST_KERNELS_PORTABLE)
#if !defined(__clang__)
// Vectors pass between functions only inlined, so the ABI of a vector argument (which differs with
// and without AVX) never matters; GCC warns about it anyway.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
template <typename T, int BYTES> struct Vector { typedef T type __attribute__((vector_size(BYTES))); };
#else
template <typename T, int BYTES> struct Vector {
    struct type {
        enum { lanes = BYTES / sizeof(T) };
        T lane[lanes];
        T &operator[](int l) { return lane[l]; }
        type &operator+=(const type &o) { for (int l = 0; l < lanes; l++) lane[l] += o.lane[l]; return *this; }
        friend type operator+(type a, const type &b) { return a += b; }
        friend type operator*(const type &a, const type &b) {
            type r;
            for (int l = 0; l < lanes; l++) r.lane[l] = a.lane[l] * b.lane[l];
            return r;
        }
        friend type operator*(T s, const type &a) {
            type r;
            for (int l = 0; l < lanes; l++) r.lane[l] = s * a.lane[l];
            return r;
        }
    };
};
#endif

template <typename V, typename T> KERNEL_INLINE V load(const T *p) {
    V v;
    std::memcpy(&v, p, sizeof v);   // an unaligned load: the planes are read at any offset
    return v;
}

template <typename V, typename T> KERNEL_INLINE void store(T *p, const V &v) { std::memcpy(p, &v, sizeof v); }

template <typename V, typename T> KERNEL_INLINE V broadcast(T s) {
    V v;
    for (int l = 0; l < (int)(sizeof(V) / sizeof(T)); l++)
        v[l] = s;
    return v;
}

// Register blocks, for the 16 vector registers of AVX2 (and SSE2). forward keeps FILTERS x
// PIXEL_VECTORS = 12 accumulators, plus the vectors of pixels and one broadcast weight: of 2..6 x
// 1..3, 4 x 3 ran the lab net's conv2 fastest (73 GFLOP/s of useful work on one Zen 3 core; 4 x 2 71,
// 6 x 2 66, 3 x 3 65; OpenBLAS's sgemm on the textbook's im2col matrix 73-81, not counting im2col).
// The two weight gradients (below) keep 12 each: GRAD_TAPS x GRAD_VECTORS (6 x 2 as fast as 3 x 4
// on conv2, 76-79; 12 x 1 64-66) and PIXEL_GRAD_FILTERS x PIXEL_GRAD_TAPS (4 x 3: 74 on conv1;
// 3 x 4 54, 2 x 6 42 on conv2).
const int FILTERS = 4, PIXEL_VECTORS = 3;
const int WIDEST = 32;   // bytes: the vectors of the AVX2 build
const int GRAD_TAPS = 6, GRAD_VECTORS = 2;
const int PIXEL_GRAD_FILTERS = 4, PIXEL_GRAD_TAPS = 3;

template <typename T, int BYTES> KERNEL_INLINE int lanes() { return BYTES / sizeof(T); }

// Shapes of one image: C channels of H x W, a k x k kernel, `pad` zeros around, stride 1.
struct Geometry {
    int C, H, W, k, pad, OH, OW, P;   // P = OH * OW output pixels
    ptrdiff_t rows, plane;            // padded rows of a shifted plane, and its length
    Geometry(int C, int H, int W, int k, int pad, int slack)
        : C(C), H(H), W(W), k(k), pad(pad), OH(H + 2 * pad - k + 1), OW(W + 2 * pad - k + 1),
          P(OH * OW), rows(H + 2 * pad),
          // A block of pixels starting at p < P reads up to p + (k - 1) * OW + slack - 1, past the last
          // row: the slack is zeros. slack = the widest block of pixels, in elements.
          plane(rows * OW + slack) {}
    int taps() const { return C * k * k; }
    ptrdiff_t image() const { return (ptrdiff_t)C * k * plane; }   // shifted planes of one image
    ptrdiff_t offset(int tap) const {   // where tap (c, i, j) = tap reads: plane (c, j), i rows down
        int c = tap / (k * k), i = tap / k % k, j = tap % k;
        return (ptrdiff_t)(c * k + j) * plane + (ptrdiff_t)i * OW;
    }
};

// The slack of a plane: the widest block of pixels of either build, in elements.
template <typename T> int plane_slack() { return PIXEL_VECTORS * WIDEST / sizeof(T); }

// The k shifted planes of every channel of one image x (C, H, W), written into `shifted` (C, k, plane).
// With zero_rows false, the zero rows above and below the image (and the slack) are taken as written
// already: they are the same for every image.
template <typename T> KERNEL_INLINE void shift_image(const Geometry &g, const T *x, T *shifted, bool zero_rows) {
    for (int c = 0; c < g.C; c++)
        for (int j = 0; j < g.k; j++) {
            T *plane = shifted + (ptrdiff_t)(c * g.k + j) * g.plane;
            T *body = plane + (ptrdiff_t)g.pad * g.OW;   // the H rows that read the image
            const T *image = x + (ptrdiff_t)c * g.H * g.W;
            // body[y][xo] = image[y][xo + shift] for the columns lo <= xo < hi that read inside, else 0
            const int shift = j - g.pad;
            const int lo = std::min(std::max(0, -shift), g.OW), hi = std::max(lo, std::min(g.OW, g.W - shift));
            if (zero_rows)
                std::fill(plane, body, T(0));   // the rows above the image
            if (g.OW == g.W) {
                // 'SAME' padding: rows of equal length, so the body is one shifted copy of the image (1.6x
                // faster than row by row: the lab's rows are 14 or 28 values) ...
                const ptrdiff_t size = (ptrdiff_t)g.H * g.W;
                const ptrdiff_t first = std::max<ptrdiff_t>(0, -shift), last = std::min(size, size - shift);
                if (first < last)
                    std::copy(image + first + shift, image + last + shift, body + first);
                // ... whose rows ran into their neighbours where a column reads outside: zeros there
                for (int y = 0; y < g.H; y++) {
                    for (int xo = 0; xo < lo; xo++)
                        body[(ptrdiff_t)y * g.OW + xo] = T(0);
                    for (int xo = hi; xo < g.OW; xo++)
                        body[(ptrdiff_t)y * g.OW + xo] = T(0);
                }
            } else {
                for (int y = 0; y < g.H; y++) {
                    T *row = body + (ptrdiff_t)y * g.OW;
                    std::fill(row, row + lo, T(0));
                    std::copy(image + (ptrdiff_t)y * g.W + lo + shift, image + (ptrdiff_t)y * g.W + hi + shift, row + lo);
                    std::fill(row + hi, row + g.OW, T(0));
                }
            }
            if (zero_rows)
                std::fill(body + (ptrdiff_t)g.H * g.OW, plane + g.plane, T(0));   // the rows below, and the slack
        }
}

// out (F, P) of one image from its shifted planes. `packed` holds the weights in blocks of FILTERS
// filters, tap by tap: packed[(f / FILTERS) * taps + tap][f % FILTERS] (zeros for f >= F), so a
// block reads its weights in order; `bias` has as many entries, zero-padded.
template <typename T, int BYTES>
KERNEL_INLINE void forward_image(const Geometry &g, const T *shifted, const T *packed, const T *bias, int F, T *out) {
    typedef typename Vector<T, BYTES>::type V;
    const int L = PIXEL_VECTORS * lanes<T, BYTES>(), taps = g.taps();
    for (int f0 = 0; f0 < F; f0 += FILTERS) {
        const T *block_weights = packed + (ptrdiff_t)f0 * taps;
        const int filters = std::min(FILTERS, F - f0);
        for (int p0 = 0; p0 < g.P; p0 += L) {
            V acc[FILTERS][PIXEL_VECTORS];
            for (int b = 0; b < FILTERS; b++)
                for (int v = 0; v < PIXEL_VECTORS; v++)
                    acc[b][v] = broadcast<V>(bias[f0 + b]);
            const T *w = block_weights;
            for (int c = 0; c < g.C; c++)
                for (int i = 0; i < g.k; i++) {
                    const T *src = shifted + (ptrdiff_t)c * g.k * g.plane + p0 + (ptrdiff_t)i * g.OW;
                    for (int j = 0; j < g.k; j++, src += g.plane, w += FILTERS) {
                        V x[PIXEL_VECTORS];
                        for (int v = 0; v < PIXEL_VECTORS; v++)
                            x[v] = load<V>(src + v * lanes<T, BYTES>());
                        for (int b = 0; b < FILTERS; b++)
                            for (int v = 0; v < PIXEL_VECTORS; v++)
                                acc[b][v] += w[b] * x[v];
                    }
                }
            if (p0 + L <= g.P) {
                for (int b = 0; b < filters; b++)
                    for (int v = 0; v < PIXEL_VECTORS; v++)
                        store(out + (ptrdiff_t)(f0 + b) * g.P + p0 + v * lanes<T, BYTES>(), acc[b][v]);
            } else {   // the last, partial block of pixels
                T rest[FILTERS][PIXEL_VECTORS * BYTES / sizeof(T)];
                for (int b = 0; b < filters; b++) {
                    for (int v = 0; v < PIXEL_VECTORS; v++)
                        store(&rest[b][v * lanes<T, BYTES>()], acc[b][v]);
                    std::copy(rest[b], rest[b] + (g.P - p0), out + (ptrdiff_t)(f0 + b) * g.P + p0);
                }
            }
        }
    }
}

// weights (F, C*k*k) and bias (F) or NULL -> packed and padded as forward_image reads them.
template <typename T>
KERNEL_INLINE void pack_weights(const Geometry &g, const T *weights, const T *bias, int F,
                              std::vector<T> &packed, std::vector<T> &padded_bias) {
    const int taps = g.taps(), blocks = (F + FILTERS - 1) / FILTERS;
    packed.assign((size_t)blocks * FILTERS * taps, T(0));
    padded_bias.assign((size_t)blocks * FILTERS, T(0));
    for (int f = 0; f < F; f++) {
        for (int t = 0; t < taps; t++)
            packed[((size_t)(f / FILTERS) * taps + t) * FILTERS + f % FILTERS] = weights[(ptrdiff_t)f * taps + t];
        if (bias)
            padded_bias[f] = bias[f];
    }
}

// x (n, C, H, W) -> out (n, F, OH, OW). The shifted planes of image m go to shifted + m * (C*k*plane)
// when keep_shifted (the layer keeps them for the weight gradient), else all to `shifted`, one image
// at a time.
template <typename T, int BYTES>
KERNEL_INLINE void forward_body(const T *x, ptrdiff_t n, int C, int H, int W, int k, int pad,
                              const T *weights, const T *bias, int F, T *shifted, bool keep_shifted, T *out) {
    const Geometry g(C, H, W, k, pad, plane_slack<T>());
    std::vector<T> packed, padded_bias;
    pack_weights(g, weights, bias, F, packed, padded_bias);
    for (ptrdiff_t m = 0; m < n; m++) {
        T *planes = shifted + (keep_shifted ? m * g.image() : 0);
        shift_image(g, x + m * (ptrdiff_t)C * H * W, planes, keep_shifted || m == 0);
        forward_image<T, BYTES>(g, planes, packed.data(), padded_bias.data(), F, out + m * (ptrdiff_t)F * g.P);
    }
}

// ---- the weight gradient
//
//     dw[f][tap] = sum over images and pixels p of g[f][p] * x[tap][p],   x[tap][p] = shifted[c][j][p + i*OW]
//
// for tap (c, i, j); and the bias gradient as one more tap, with x = 1. Two ways to put these sums
// into vector lanes suit two shapes of layer:
//   - lanes over filters, for layers with many taps (the lab's conv2: 401): each image's gradient is
//     first transposed to gT[p][f], so that one vector holds one pixel's gradient for consecutive
//     filters; a block of GRAD_TAPS taps x GRAD_VECTORS vectors of filters keeps its sums in registers
//     over all the image's pixels, each pixel adding x (one number per tap, broadcast) times gT.
//     On conv2: 76-79 GFLOP/s (lanes over pixels: 59, its 196 pixels are 24.5 vectors, so short loops).
//   - lanes over pixels, for layers with few taps (conv1: 26 taps, but 784 pixels): the transpose
//     would cost as much as the multiply-adds (58 GFLOP/s); instead a block of PIXEL_GRAD_FILTERS
//     filters x PIXEL_GRAD_TAPS taps keeps one sum per lane (p mod lanes), added up after the last
//     image (74 GFLOP/s on conv1).
// Each entry is a sum of its own, in an order that does not depend on which taps a call computes.
const int MANY_TAPS = 64;

template <typename T>   // the plane a tap reads: of the image, of ones (the bias), or zeros (padding a block)
KERNEL_INLINE const T *tap_plane(const Geometry &g, const T *planes, int tap, int tap_end, const T *zeros, const T *ones) {
    return tap >= tap_end ? zeros : tap < g.taps() ? planes + g.offset(tap) : ones;
}

// One block, lanes over filters: partial[t][f] += sum over p of x[t][p] * grad_t[p][f], for the
// GRAD_VECTORS vectors of filters from grad_t[p][0].
template <typename T, int BYTES>
KERNEL_INLINE void filter_lanes_block(const T *const *x, const T *grad_t, ptrdiff_t grad_row, int P, T *partial,
                                      ptrdiff_t partial_row) {
    typedef typename Vector<T, BYTES>::type V;
    V acc[GRAD_TAPS][GRAD_VECTORS];
    for (int t = 0; t < GRAD_TAPS; t++)
        for (int v = 0; v < GRAD_VECTORS; v++)
            acc[t][v] = broadcast<V>(T(0));
    for (int p = 0; p < P; p++, grad_t += grad_row) {
        V g[GRAD_VECTORS];
        for (int v = 0; v < GRAD_VECTORS; v++)
            g[v] = load<V>(grad_t + v * lanes<T, BYTES>());
        for (int t = 0; t < GRAD_TAPS; t++)
            for (int v = 0; v < GRAD_VECTORS; v++)
                acc[t][v] += x[t][p] * g[v];
    }
    // Added to partial here, rather than loaded into acc first: the loop need not wait for memory.
    for (int t = 0; t < GRAD_TAPS; t++)
        for (int v = 0; v < GRAD_VECTORS; v++) {
            T *sum = partial + t * partial_row + v * lanes<T, BYTES>();
            store(sum, load<V>(sum) + acc[t][v]);
        }
}

template <typename T, int BYTES>
KERNEL_INLINE void weight_grad_filter_lanes(const Geometry &g, const T *shifted, const T *grad_out, ptrdiff_t n,
                                            int F, int tap_begin, int tap_end, T *grad_weights, T *grad_bias) {
    const int block_filters = GRAD_VECTORS * lanes<T, BYTES>();
    const int padded_F = (F + block_filters - 1) / block_filters * block_filters;
    const int blocks = (tap_end - tap_begin + GRAD_TAPS - 1) / GRAD_TAPS;
    std::vector<T> zeros(g.P, T(0)), ones(g.P, T(1));
    std::vector<T> grad_t((size_t)g.P * padded_F, T(0));   // the filters past F stay zero
    std::vector<T> partial((size_t)blocks * GRAD_TAPS * padded_F, T(0));   // (taps, padded_F)
    for (ptrdiff_t m = 0; m < n; m++) {
        const T *planes = shifted + m * g.image(), *grad = grad_out + m * (ptrdiff_t)F * g.P;
        for (int p = 0; p < g.P; p++)
            for (int f = 0; f < F; f++)
                grad_t[(size_t)p * padded_F + f] = grad[(ptrdiff_t)f * g.P + p];
        for (int block = 0; block < blocks; block++) {
            const T *x[GRAD_TAPS];
            for (int t = 0; t < GRAD_TAPS; t++)
                x[t] = tap_plane(g, planes, tap_begin + block * GRAD_TAPS + t, tap_end, zeros.data(), ones.data());
            for (int f0 = 0; f0 < padded_F; f0 += block_filters)
                filter_lanes_block<T, BYTES>(x, grad_t.data() + f0, padded_F, g.P,
                                   &partial[(size_t)block * GRAD_TAPS * padded_F + f0], padded_F);
        }
    }
    for (int tap = tap_begin; tap < tap_end; tap++)
        for (int f = 0; f < F; f++) {
            T sum = partial[(size_t)(tap - tap_begin) * padded_F + f];
            (tap < g.taps() ? grad_weights[(ptrdiff_t)f * g.taps() + tap] : grad_bias[f]) = sum;
        }
}

// What one block, lanes over pixels, reads: for each of its filters and taps, the full vectors of
// pixels from the planes themselves, and the last, partial vector (when lanes do not divide P)
// from copies padded with zeros, so that no load reads past a plane and no lane past P adds
// anything, even where x holds an inf or a NaN.
template <typename T> struct PixelLanesBlock {
    const T *grad[PIXEL_GRAD_FILTERS], *x[PIXEL_GRAD_TAPS];             // planes: the full vectors
    const T *grad_tail[PIXEL_GRAD_FILTERS], *x_tail[PIXEL_GRAD_TAPS];   // their last pixels
};

template <typename T, int BYTES>
KERNEL_INLINE void pixel_lanes_multiply_add(typename Vector<T, BYTES>::type (&acc)[PIXEL_GRAD_FILTERS][PIXEL_GRAD_TAPS],
                                            const T *const *grad, const T *const *x, ptrdiff_t p) {
    typedef typename Vector<T, BYTES>::type V;
    V xv[PIXEL_GRAD_TAPS];
    for (int t = 0; t < PIXEL_GRAD_TAPS; t++)
        xv[t] = load<V>(x[t] + p);
    for (int b = 0; b < PIXEL_GRAD_FILTERS; b++) {
        V gv = load<V>(grad[b] + p);
        for (int t = 0; t < PIXEL_GRAD_TAPS; t++)
            acc[b][t] += gv * xv[t];
    }
}

// One block, lanes over pixels: adds one image's products to partial[b * row + t * lanes + lane].
template <typename T, int BYTES>
KERNEL_INLINE void pixel_lanes_block(const PixelLanesBlock<T> &in, int full, bool tail, T *partial, ptrdiff_t row) {
    typedef typename Vector<T, BYTES>::type V;
    V acc[PIXEL_GRAD_FILTERS][PIXEL_GRAD_TAPS];
    for (int b = 0; b < PIXEL_GRAD_FILTERS; b++)
        for (int t = 0; t < PIXEL_GRAD_TAPS; t++)
            acc[b][t] = broadcast<V>(T(0));
    for (int p = 0; p < full; p += lanes<T, BYTES>())
        pixel_lanes_multiply_add<T, BYTES>(acc, in.grad, in.x, p);
    if (tail)
        pixel_lanes_multiply_add<T, BYTES>(acc, in.grad_tail, in.x_tail, 0);
    for (int b = 0; b < PIXEL_GRAD_FILTERS; b++)
        for (int t = 0; t < PIXEL_GRAD_TAPS; t++) {
            T *sum = partial + b * row + t * lanes<T, BYTES>();
            store(sum, load<V>(sum) + acc[b][t]);
        }
}

template <typename T, int BYTES>
KERNEL_INLINE void weight_grad_pixel_lanes(const Geometry &g, const T *shifted, const T *grad_out, ptrdiff_t n,
                                           int F, int tap_begin, int tap_end, T *grad_weights, T *grad_bias) {
    const int L = lanes<T, BYTES>(), full = g.P / L * L, rest = g.P - full;
    const int blocks = (tap_end - tap_begin + PIXEL_GRAD_TAPS - 1) / PIXEL_GRAD_TAPS;
    const int filter_blocks = (F + PIXEL_GRAD_FILTERS - 1) / PIXEL_GRAD_FILTERS;
    std::vector<T> zeros(std::max(g.P, L), T(0)), ones(g.P, T(1));
    std::vector<T> grad_tails((size_t)F * L), x_tails((size_t)(tap_end - tap_begin) * L);
    const ptrdiff_t row = (ptrdiff_t)blocks * PIXEL_GRAD_TAPS * L;   // lane sums: (filters, taps, lanes)
    std::vector<T> partial((size_t)filter_blocks * PIXEL_GRAD_FILTERS * row, T(0));
    for (ptrdiff_t m = 0; m < n; m++) {
        const T *planes = shifted + m * g.image(), *grad = grad_out + m * (ptrdiff_t)F * g.P;
        for (int l = 0; l < rest; l++) {   // this image's tails (the lanes past rest stay zero)
            for (int f = 0; f < F; f++)
                grad_tails[f * L + l] = grad[(ptrdiff_t)f * g.P + full + l];
            for (int tap = tap_begin; tap < tap_end; tap++)
                x_tails[(tap - tap_begin) * L + l] = tap_plane(g, planes, tap, tap_end, zeros.data(), ones.data())[full + l];
        }
        PixelLanesBlock<T> in;
        for (int block = 0; block < blocks; block++) {
            for (int t = 0; t < PIXEL_GRAD_TAPS; t++) {
                int tap = tap_begin + block * PIXEL_GRAD_TAPS + t;
                in.x[t] = tap_plane(g, planes, tap, tap_end, zeros.data(), ones.data());
                in.x_tail[t] = tap < tap_end ? &x_tails[(tap - tap_begin) * L] : zeros.data();
            }
            for (int fb = 0; fb < filter_blocks; fb++) {
                for (int b = 0; b < PIXEL_GRAD_FILTERS; b++) {
                    int f = fb * PIXEL_GRAD_FILTERS + b;   // filters that pad the last block read zeros
                    in.grad[b] = f < F ? grad + (ptrdiff_t)f * g.P : zeros.data();
                    in.grad_tail[b] = f < F ? &grad_tails[f * L] : zeros.data();
                }
                pixel_lanes_block<T, BYTES>(in, full, rest > 0,
                                  &partial[fb * PIXEL_GRAD_FILTERS * row + block * PIXEL_GRAD_TAPS * L], row);
            }
        }
    }
    for (int f = 0; f < F; f++)
        for (int tap = tap_begin; tap < tap_end; tap++) {
            const T *lane_sums = &partial[f * row + (tap - tap_begin) * L];
            T sum = 0;
            for (int l = 0; l < L; l++)
                sum += lane_sums[l];
            (tap < g.taps() ? grad_weights[(ptrdiff_t)f * g.taps() + tap] : grad_bias[f]) = sum;
        }
}

// The weight and bias gradients, for the taps [tap_begin, tap_end) of C*k*k + 1, summed over n images.
// grad_out (n, F, OH, OW), shifted (n, C, k, plane) as forward kept them. Only the given taps'
// columns of grad_weights (F, C*k*k) (and grad_bias, if it is in range) are written, so threads can
// share the arrays, and any split between threads gives the same results, bit for bit.
template <typename T, int BYTES>
KERNEL_INLINE void weight_grad_body(const T *shifted, const T *grad_out, ptrdiff_t n, int C, int H, int W, int k,
                                    int pad, int F, int tap_begin, int tap_end, T *grad_weights, T *grad_bias) {
    const Geometry g(C, H, W, k, pad, plane_slack<T>());
    if (g.taps() + 1 >= MANY_TAPS)
        weight_grad_filter_lanes<T, BYTES>(g, shifted, grad_out, n, F, tap_begin, tap_end, grad_weights, grad_bias);
    else
        weight_grad_pixel_lanes<T, BYTES>(g, shifted, grad_out, n, F, tap_begin, tap_end, grad_weights, grad_bias);
}

// ---- ReLU: one pass over memory each way (NumPy makes two forward: the mask, then the maximum).
// Plain loops, one build: they are bound by memory, and compilers vectorise them for any target.

// out = max(x, 0) exactly as np.maximum(x, 0) (a NaN stays NaN, -0 becomes +0), positive = x > 0.
template <typename T> void relu_forward(const T *x, ptrdiff_t n, T *out, unsigned char *positive) {
    for (ptrdiff_t i = 0; i < n; i++) {
        positive[i] = x[i] > 0;
        out[i] = x[i] > 0 || x[i] != x[i] ? x[i] : T(0);
    }
}

// grad_x = grad_out * positive: a product, as in layers.ReLU, so a NaN gradient stays NaN everywhere.
template <typename T> void relu_backward(const T *grad_out, const unsigned char *positive, ptrdiff_t n, T *grad_x) {
    for (ptrdiff_t i = 0; i < n; i++)
        grad_x[i] = grad_out[i] * T(positive[i]);
}

// ---- the convolution's entry points: its plain build and its AVX2 + FMA build, chosen at run time

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define KERNEL_AVX2 __attribute__((target("avx2,fma")))
inline bool has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
#define KERNEL_AVX2
inline bool has_avx2() { return false; }
#endif

template <typename T> KERNEL_AVX2 void forward_avx2(const T *x, ptrdiff_t n, int C, int H, int W, int k, int pad,
                                                  const T *weights, const T *bias, int F, T *shifted, bool keep, T *out) {
    forward_body<T, 32>(x, n, C, H, W, k, pad, weights, bias, F, shifted, keep, out);
}
template <typename T> void forward_plain(const T *x, ptrdiff_t n, int C, int H, int W, int k, int pad,
                                         const T *weights, const T *bias, int F, T *shifted, bool keep, T *out) {
    forward_body<T, 16>(x, n, C, H, W, k, pad, weights, bias, F, shifted, keep, out);
}
template <typename T> void forward(const T *x, ptrdiff_t n, int C, int H, int W, int k, int pad,
                                   const T *weights, const T *bias, int F, T *shifted, bool keep, T *out) {
    (has_avx2() ? forward_avx2<T> : forward_plain<T>)(x, n, C, H, W, k, pad, weights, bias, F, shifted, keep, out);
}

template <typename T> KERNEL_AVX2 void weight_grad_avx2(const T *shifted, const T *grad_out, ptrdiff_t n, int C, int H,
                                                      int W, int k, int pad, int F, int begin, int end, T *gw, T *gb) {
    weight_grad_body<T, 32>(shifted, grad_out, n, C, H, W, k, pad, F, begin, end, gw, gb);
}
template <typename T> void weight_grad_plain(const T *shifted, const T *grad_out, ptrdiff_t n, int C, int H,
                                             int W, int k, int pad, int F, int begin, int end, T *gw, T *gb) {
    weight_grad_body<T, 16>(shifted, grad_out, n, C, H, W, k, pad, F, begin, end, gw, gb);
}
template <typename T> void weight_grad(const T *shifted, const T *grad_out, ptrdiff_t n, int C, int H,
                                       int W, int k, int pad, int F, int begin, int end, T *gw, T *gb) {
    (has_avx2() ? weight_grad_avx2<T> : weight_grad_plain<T>)(shifted, grad_out, n, C, H, W, k, pad, F, begin, end, gw, gb);
}

template <typename T> ptrdiff_t plane_length(int H, int W, int k, int pad) {
    return Geometry(1, H, W, k, pad, plane_slack<T>()).plane;
}

}  // namespace kernels

#endif
