// Training-mode BatchNorm + ReLU over a channels_last activation, forward and backward, in two passes over memory
// each (benchmarks/fused_bn_relu.py builds this file on first use and explains why it exists).
//
// The activation is viewed as rows x channels: [N*H*W, C], C contiguous (a channels_last tensor is exactly that).
// The vector lanes are 16 (AVX-512) or 8 (AVX2) neighbouring channels of one row; the rows are split between
// torch's threads (at::parallel_for). Values are stored as fp32 or bf16 and computed in fp32.
//
// Sums over rows: each thread adds 64 rows at a time in fp32 into per-channel partial sums, then moves them into
// fp64 totals, so no fp32 sum ever holds more than 64 terms. The forward statistics are sums of (x - k) and
// (x - k)^2 with k the thread's first row (a per-channel shift against cancellation); the exact mean and variance
// follow in fp64.

// ATen and torch's pybind11 casters rather than <torch/extension.h>, which alone took 23 s of a ~25 s build.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kFlushRows = 64;
constexpr int64_t kBatchRows = 16;  // rows per pass over a channel group in the sums (4, 8, 16: 16 was fastest)

// One register of fp32 lanes as a GCC vector type: 16 with AVX-512, 8 with AVX2, so the same code is explicit
// vector code on both. (16 lanes split over two AVX2 registers ran at half eager's speed: GCC spilled them and
// built the ReLU's compare-and-select element by element.) Intrinsics only where AVX-512 has one instruction for a
// bf16 conversion. Channels are taken kLanes at a time; the rest one by one.
#ifdef __AVX512F__
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vu32 __attribute__((vector_size(kLanes * 4)));
typedef uint16_t vu16 __attribute__((vector_size(kLanes * 2)));

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {  // bf16 is the high half of an fp32
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline uint32_t round_bits(uint32_t bits) { return (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16; }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {  // round to nearest even, as torch's own conversion
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  p[i] = static_cast<uint16_t>(v != v ? 0x7FC0u : round_bits(bits));
}

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
#ifdef __AVX512BW__
inline vf vload(const uint16_t* p) {  // widen 16 bf16 to 16 fp32 in two instructions
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
  vf v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
#else
inline vf vload(const uint16_t* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof(h));
  vu32 w = __builtin_convertvector(h, vu32) << 16;
  vf v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
#endif
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
#ifdef __AVX512BF16__
inline void vstore(uint16_t* p, vf v) {  // the CPU's own conversion (round to nearest even, NaN kept)
  __m512 m;
  std::memcpy(&m, &v, sizeof(m));
  const __m256bh h = _mm512_cvtneps_pbh(m);
  std::memcpy(p, &h, sizeof(h));
}
#else
inline void vstore(uint16_t* p, vf v) {
  vu32 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const vu32 nan = reinterpret_cast<vu32>(v != v);  // all ones where v is NaN
  const vu32 r = ((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16 & ~nan) | (0x7FC0u & nan);
  vu16 h = __builtin_convertvector(r, vu16);
  std::memcpy(p, &h, sizeof(h));
}
#endif
inline vf vmax0(vf v) { return v > 0.f ? v : vf{}; }

// The rows [0, rows) cut into at most `parts` contiguous blocks, one per task.
struct Blocks {
  int64_t parts, step;
  Blocks(int64_t rows, int64_t parts_wanted) {
    parts = std::max<int64_t>(1, std::min<int64_t>(parts_wanted, rows));
    step = (rows + parts - 1) / parts;
    parts = (rows + step - 1) / step;
  }
  int64_t begin(int64_t p) const { return p * step; }
  int64_t end(int64_t p, int64_t rows) const { return std::min(rows, (p + 1) * step); }
};

// Per-channel sums over rows [r0, r1) of two functions of (row, channel): `vec(r, c, u, w)` for a block of kLanes
// channels, `one(r, c, u, w)` for a single one. The rows are read kBatchRows at a time: for each group of 4
// blocks (4 * kLanes channels) the partial sums come from a small array (L1) into registers, take those rows, and go
// back. Every 64 rows the fp32 partial sums move into s1, s2 (fp64).
template <int64_t NB, typename V>
inline void add_rows(int64_t r, int64_t n, int64_t c, vf* a, vf* q, V& vec) {
  vf ra[NB], rq[NB];
  for (int64_t j = 0; j < NB; ++j) {
    ra[j] = a[j];
    rq[j] = q[j];
  }
  for (int64_t k = 0; k < n; ++k) {
    for (int64_t j = 0; j < NB; ++j) vec(r + k, c + j * kLanes, ra[j], rq[j]);
  }
  for (int64_t j = 0; j < NB; ++j) {
    a[j] = ra[j];
    q[j] = rq[j];
  }
}

template <typename V, typename S>
void sum_rows(int64_t r0, int64_t r1, int64_t C, double* s1, double* s2, V vec, S one) {
  const int64_t blocks = C / kLanes, tail = blocks * kLanes;
  std::vector<vf> a(blocks), q(blocks);
  std::vector<float> at(C - tail), qt(C - tail);
  for (int64_t r = r0; r < r1; r += kFlushRows) {
    const int64_t re = std::min(r1, r + kFlushRows);
    std::fill(a.begin(), a.end(), vf{});
    std::fill(q.begin(), q.end(), vf{});
    std::fill(at.begin(), at.end(), 0.f);
    std::fill(qt.begin(), qt.end(), 0.f);
    for (int64_t rr = r; rr < re; rr += kBatchRows) {
      const int64_t n = std::min<int64_t>(kBatchRows, re - rr);
      int64_t i = 0;
      for (; i + 4 <= blocks; i += 4) add_rows<4>(rr, n, i * kLanes, &a[i], &q[i], vec);
      for (; i < blocks; ++i) add_rows<1>(rr, n, i * kLanes, &a[i], &q[i], vec);
      for (int64_t k = rr; k < rr + n; ++k) {
        for (int64_t c = tail; c < C; ++c) one(k, c, at[c - tail], qt[c - tail]);
      }
    }
    for (int64_t i = 0; i < blocks; ++i) {
      for (int64_t v = 0; v < kLanes; ++v) {
        s1[i * kLanes + v] += a[i][v];
        s2[i * kLanes + v] += q[i][v];
      }
    }
    for (int64_t c = tail; c < C; ++c) {
      s1[c] += at[c - tail];
      s2[c] += qt[c - tail];
    }
  }
}

// out[r, c] = f(r, c) for every row: `vec` for blocks of kLanes channels, `one` for the rest.
template <typename T, typename V, typename S>
void map_rows(T* __restrict out, int64_t rows, int64_t C, V vec, S one) {
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* o = out + r * C;
      int64_t c = 0;
      for (; c + kLanes <= C; c += kLanes) vstore(o + c, vec(r, c));
      for (; c < C; ++c) store(o, c, one(r, c));
    }
  });
}

// Batch mean and (biased) variance per channel. Each task sums x - k and (x - k)^2 with k its first row.
template <typename T>
void stats(const T* __restrict x, int64_t rows, int64_t C, std::vector<double>& mean, std::vector<double>& var) {
  Blocks b(rows, at::get_num_threads());
  std::vector<double> s1(b.parts * C, 0.0), s2(b.parts * C, 0.0);
  std::vector<float> shift(b.parts * C);
  at::parallel_for(0, b.parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* k = &shift[p * C];
      for (int64_t c = 0; c < C; ++c) shift[p * C + c] = load(x, b.begin(p) * C + c);
      sum_rows(
          b.begin(p), b.end(p, rows), C, &s1[p * C], &s2[p * C],
          [=](int64_t r, int64_t c, vf& a, vf& q) {
            const vf d = vload(x + r * C + c) - vload(k + c);
            a += d;
            q += d * d;
          },
          [&](int64_t r, int64_t c, float& a, float& q) {
            const float d = load(x, r * C + c) - k[c];
            a += d;
            q += d * d;
          });
    }
  });
  for (int64_t c = 0; c < C; ++c) {  // raw moments from the shifted ones, in fp64
    double sum = 0.0, sumsq = 0.0;
    for (int64_t p = 0; p < b.parts; ++p) {
      const double n = static_cast<double>(b.end(p, rows) - b.begin(p));
      const double k = shift[p * C + c], s = s1[p * C + c];
      sum += s + n * k;
      sumsq += s2[p * C + c] + 2.0 * k * s + n * k * k;
    }
    mean[c] = sum / rows;
    var[c] = std::max(0.0, sumsq / rows - mean[c] * mean[c]);
  }
}

template <typename T>
void normalize_relu(const T* __restrict x, T* __restrict out, int64_t rows, int64_t C, const float* __restrict scale,
                    const float* __restrict shift) {
  map_rows(
      out, rows, C,
      [=](int64_t r, int64_t c) { return vmax0(vload(x + r * C + c) * vload(scale + c) + vload(shift + c)); },
      [&](int64_t r, int64_t c) { return std::max(0.f, load(x, r * C + c) * scale[c] + shift[c]); });
}

// Per channel: sum of g and of g * (x - mean), where g is the output gradient where the ReLU passed (y > 0).
template <typename T>
void grad_sums(const T* __restrict dy, const T* __restrict x, int64_t rows, int64_t C, const float* __restrict scale,
               const float* __restrict shift, const float* __restrict mean, std::vector<double>& sum_g,
               std::vector<double>& sum_gx) {
  Blocks b(rows, at::get_num_threads());
  std::vector<double> s1(b.parts * C, 0.0), s2(b.parts * C, 0.0);
  at::parallel_for(0, b.parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      sum_rows(
          b.begin(p), b.end(p, rows), C, &s1[p * C], &s2[p * C],
          [=](int64_t r, int64_t c, vf& a, vf& q) {
            const vf xv = vload(x + r * C + c);
            const vf g = xv * vload(scale + c) + vload(shift + c) > 0.f ? vload(dy + r * C + c) : vf{};
            a += g;
            q += g * (xv - vload(mean + c));
          },
          [&](int64_t r, int64_t c, float& a, float& q) {
            const float xv = load(x, r * C + c);
            const float g = xv * scale[c] + shift[c] > 0.f ? load(dy, r * C + c) : 0.f;
            a += g;
            q += g * (xv - mean[c]);
          });
    }
  });
  for (int64_t p = 0; p < b.parts; ++p) {
    for (int64_t c = 0; c < C; ++c) {
      sum_g[c] += s1[p * C + c];
      sum_gx[c] += s2[p * C + c];
    }
  }
}

// dx = k1 * g - c0 - c1 * (x - mean), with g masked as above.
template <typename T>
void grad_input(const T* __restrict dy, const T* __restrict x, T* __restrict dx, int64_t rows, int64_t C,
                const float* __restrict scale, const float* __restrict shift, const float* __restrict mean,
                const float* __restrict k1, const float* __restrict c0, const float* __restrict c1) {
  map_rows(
      dx, rows, C,
      [=](int64_t r, int64_t c) {
        const vf xv = vload(x + r * C + c);
        const vf g = xv * vload(scale + c) + vload(shift + c) > 0.f ? vload(dy + r * C + c) : vf{};
        return vload(k1 + c) * g - vload(c0 + c) - vload(c1 + c) * (xv - vload(mean + c));
      },
      [&](int64_t r, int64_t c) {
        const float xv = load(x, r * C + c);
        const float g = xv * scale[c] + shift[c] > 0.f ? load(dy, r * C + c) : 0.f;
        return k1[c] * g - c0[c] - c1[c] * (xv - mean[c]);
      });
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast), name,
              " must be a 4-d channels_last tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name, " must be fp32 or bf16");
}

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// The per-channel affine map of the forward: y = x * scale + shift (scale = weight * invstd).
std::vector<at::Tensor> affine(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                               const at::Tensor& bias) {
  at::Tensor scale = as_float(weight) * invstd;
  at::Tensor shift = as_float(bias) - mean * scale;
  return {scale.contiguous(), shift.contiguous()};
}

}  // namespace

// Returns (out, mean, invstd, unbiased variance); mean and invstd are what backward takes.
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                double eps) {
  check(x, "input");
  const int64_t C = x.size(1), rows = x.numel() / C;
  TORCH_CHECK(rows > 1, "batch norm needs more than one value per channel");
  std::vector<double> mean(C), var(C);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  if (x.scalar_type() == at::kFloat) {
    stats(x.data_ptr<float>(), rows, C, mean, var);
  } else {
    stats(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), rows, C, mean, var);
  }
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor mean_t = at::from_blob(mean.data(), {C}, f64).to(at::kFloat);
  at::Tensor var_t = at::from_blob(var.data(), {C}, f64);
  at::Tensor invstd = (var_t + eps).rsqrt().to(at::kFloat);
  at::Tensor unbiased = (var_t * (static_cast<double>(rows) / (rows - 1))).to(at::kFloat);
  auto ab = affine(mean_t, invstd, weight, bias);
  const float* scale = ab[0].data_ptr<float>();
  const float* shift = ab[1].data_ptr<float>();
  if (x.scalar_type() == at::kFloat) {
    normalize_relu(x.data_ptr<float>(), out.data_ptr<float>(), rows, C, scale, shift);
  } else {
    normalize_relu(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
                   reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), rows, C, scale, shift);
  }
  return {out, mean_t, invstd, unbiased};
}

// Returns (grad_input, grad_weight, grad_bias) of out = relu(batch_norm(x)) in training mode.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                                 const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias) {
  check(x, "input");
  at::Tensor dy = grad_out.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t C = x.size(1), rows = x.numel() / C;
  auto ab = affine(mean, invstd, weight, bias);
  const float* scale = ab[0].data_ptr<float>();
  const float* shift = ab[1].data_ptr<float>();
  at::Tensor mean_c = mean.contiguous();
  std::vector<double> sum_g(C, 0.0), sum_gx(C, 0.0);
  const bool f32 = x.scalar_type() == at::kFloat;
  if (f32) {
    grad_sums(dy.data_ptr<float>(), x.data_ptr<float>(), rows, C, scale, shift, mean_c.data_ptr<float>(), sum_g,
              sum_gx);
  } else {
    grad_sums(reinterpret_cast<const uint16_t*>(dy.data_ptr<at::BFloat16>()),
              reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), rows, C, scale, shift,
              mean_c.data_ptr<float>(), sum_g, sum_gx);
  }
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor grad_bias = at::from_blob(sum_g.data(), {C}, f64).clone();
  at::Tensor grad_weight = at::from_blob(sum_gx.data(), {C}, f64) * invstd.to(at::kDouble);
  // dx = weight * invstd * (g - mean(g) - xhat * mean(g * xhat))
  at::Tensor k1 = (as_float(weight) * invstd).contiguous();
  at::Tensor c0 = (k1.to(at::kDouble) * grad_bias / rows).to(at::kFloat).contiguous();
  at::Tensor c1 = (k1.to(at::kDouble) * invstd.to(at::kDouble) * grad_weight / rows).to(at::kFloat).contiguous();
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  if (f32) {
    grad_input(dy.data_ptr<float>(), x.data_ptr<float>(), dx.data_ptr<float>(), rows, C, scale, shift,
               mean_c.data_ptr<float>(), k1.data_ptr<float>(), c0.data_ptr<float>(), c1.data_ptr<float>());
  } else {
    grad_input(reinterpret_cast<const uint16_t*>(dy.data_ptr<at::BFloat16>()),
               reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
               reinterpret_cast<uint16_t*>(dx.data_ptr<at::BFloat16>()), rows, C, scale, shift,
               mean_c.data_ptr<float>(), k1.data_ptr<float>(), c0.data_ptr<float>(), c1.data_ptr<float>());
  }
  return {dx, grad_weight.to(weight.scalar_type()), grad_bias.to(bias.scalar_type())};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "relu(batch_norm(x)) in training mode: (out, mean, invstd, unbiased variance)");
  m.def("backward", &backward, "its (grad_input, grad_weight, grad_bias)");
}
