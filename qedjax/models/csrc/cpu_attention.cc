// qedjax's CPU flash attention: forward and backward as XLA FFI handlers, fp32 (issue 22).
//
// The same attention as qedjax/models/attention.py (a query sees the keys of its own segment at
// slots up to its own), computed the FlashAttention way, block by block, but with each block pair's
// softmax done in one pass over a score block that stays in the core's cache, and the products by
// MKL's sgemm (one thread per work item; items spread over `threads` threads).
//
// Shapes (row-major): q, out, d_out [B, T, K, G, H]; k, v [B, S, K, H]; q_seg, q_slots int32 [B, T];
// kv_seg int32 [B, S]; kv_slots int32 [S]; lse [B, K, T, G] (each row's log-sum-exp, 0 for a row that
// sees no key, whose output is 0). Inside, a query block of C positions of one key head is a packed
// [C x G, H] matrix (row = position x G + head), pre-multiplied by the softmax scale.
//
// Forward: one item per (b, key head, query block); it runs over the key blocks with a running max
// and sum. Backward: one item per (b, key head, key block), holding dK and dV for its keys and
// running over the query blocks; dQ goes to a per-thread fp32 buffer, summed at the end.
// A block pair none of whose queries sees any key is skipped; one where every query sees every key
// takes no mask.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

typedef void (*Sgemm)(int, int, int, int, int, int, float, const float*, int, const float*, int, float,
                      float*, int);
typedef int (*SetThreadsLocal)(int);
static Sgemm sgemm = nullptr;
static SetThreadsLocal set_threads_local = nullptr;

extern "C" void qedjax_attention_set_blas(void* gemm, void* threads_local) {
  sgemm = reinterpret_cast<Sgemm>(gemm);
  set_threads_local = reinterpret_cast<SetThreadsLocal>(threads_local);
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// C[m, n] (ldc) = alpha op(A) op(B) + beta C
inline void Gemm(bool ta, bool tb, int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc) {
  sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
}

// exp(x) for x in [-87, 88] to about 1 ulp: 2^n e^f with n = round(x / ln 2), |f| <= ln 2 / 2, e^f by
// its Taylor series to degree 7 (truncation below 6e-9). Written so the compiler vectorizes loops over it.
inline float Exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  const float f = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln 2 in two parts
  float p = 1.0f / 5040;
  p = p * f + 1.0f / 720;
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// The largest x[c] (where vis[c], if given) for c < n; -inf if none. In 16 lanes, so that it vectorizes.
inline float RowMax(const float* x, const uint8_t* vis, int64_t n) {
  float lane[16];
  for (int i = 0; i < 16; ++i) lane[i] = -INFINITY;
  int64_t c = 0;
  for (; c + 16 <= n; c += 16)
    for (int i = 0; i < 16; ++i) {
      const float y = vis == nullptr || vis[c + i] ? x[c + i] : -INFINITY;
      lane[i] = lane[i] > y ? lane[i] : y;
    }
  for (; c < n; ++c) {
    const float y = vis == nullptr || vis[c] ? x[c] : -INFINITY;
    lane[0] = lane[0] > y ? lane[0] : y;
  }
  float mx = lane[0];
  for (int i = 1; i < 16; ++i) mx = mx > lane[i] ? mx : lane[i];
  return mx;
}

struct Dims {
  int64_t B, T, S, K, G, H, cq, ck, nq, nk;
};

struct Masks {
  const int32_t *q_seg, *q_slots, *kv_seg, *kv_slots;
};

enum Kind { kNone = 0, kAll = 1, kSome = 2 };

// Which keys of block pair (queries t0..t0+tc, keys s0..s0+sc) of batch row b each query sees:
// vis[tt * sc + ss]. Returns the pair's kind.
Kind PairMask(const Dims& d, const Masks& mk, int64_t b, int64_t t0, int64_t tc, int64_t s0, int64_t sc,
              uint8_t* vis) {
  int64_t seen = 0;
  for (int64_t tt = 0; tt < tc; ++tt) {
    const int32_t seg = mk.q_seg[b * d.T + t0 + tt], slot = mk.q_slots[b * d.T + t0 + tt];
    const int32_t* kseg = mk.kv_seg + b * d.S + s0;
    const int32_t* kslot = mk.kv_slots + s0;
    uint8_t* row = vis + tt * sc;
    int64_t n = 0;
#pragma omp simd reduction(+ : n)
    for (int64_t ss = 0; ss < sc; ++ss) {
      const uint8_t v = (kseg[ss] == seg) & (kslot[ss] <= slot);
      row[ss] = v;
      n += v;
    }
    seen += n;
  }
  return seen == 0 ? kNone : (seen == tc * sc ? kAll : kSome);
}

// The [tc x G, H] rows of query block t0 of (b, kh) from x [B, T, K, G, H], times `scale`.
void PackRows(const Dims& d, const float* x, int64_t b, int64_t kh, int64_t t0, int64_t tc, float scale,
              float* out) {
  const int64_t gh = d.G * d.H;
  for (int64_t tt = 0; tt < tc; ++tt) {
    const float* src = x + ((b * d.T + t0 + tt) * d.K + kh) * gh;
    float* dst = out + tt * gh;
#pragma omp simd
    for (int64_t i = 0; i < gh; ++i) dst[i] = src[i] * scale;
  }
}

// Runs item(i, worker) for i in [0, n) on up to `threads` threads (this one included), each with MKL
// kept to one thread.
template <typename F>
void ParallelFor(int64_t n, int threads, F item) {
  std::atomic<int64_t> next{0};
  auto work = [&](int worker) {
    const int before = set_threads_local ? set_threads_local(1) : 0;
    for (int64_t i = next++; i < n; i = next++) item(i, worker);
    if (set_threads_local) set_threads_local(before);
  };
  const int extra = static_cast<int>(std::min<int64_t>(threads, n)) - 1;
  std::vector<std::thread> pool;
  for (int w = 1; w <= extra; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& t : pool) t.join();
}

ffi::Error Check(const Dims& d, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer q_seg,
                 ffi::AnyBuffer q_slots, ffi::AnyBuffer kv_seg, ffi::AnyBuffer kv_slots) {
  if (sgemm == nullptr) return ffi::Error::Internal("qedjax_attention: no sgemm was set");
  for (auto* x : {&q, &k, &v})
    if (x->element_type() != ffi::F32) return ffi::Error::InvalidArgument("qedjax_attention: q, k, v must be float32");
  for (auto* x : {&q_seg, &q_slots, &kv_seg, &kv_slots})
    if (x->element_type() != ffi::S32)
      return ffi::Error::InvalidArgument("qedjax_attention: segments and slots must be int32");
  auto dq = q.dimensions(), dk = k.dimensions(), dv = v.dimensions();
  if (dq.size() != 5 || dk.size() != 4 || dv.size() != 4 || dk[0] != d.B || dk[2] != d.K || dk[3] != d.H ||
      std::vector<int64_t>(dk.begin(), dk.end()) != std::vector<int64_t>(dv.begin(), dv.end()) ||
      q_seg.element_count() != d.B * d.T || q_slots.element_count() != d.B * d.T ||
      kv_seg.element_count() != d.B * d.S || kv_slots.element_count() != d.S)
    return ffi::Error::InvalidArgument("qedjax_attention: shapes do not match [B,T,K,G,H] / [B,S,K,H]");
  if (d.cq < 1 || d.ck < 1) return ffi::Error::InvalidArgument("qedjax_attention: blocks must be >= 1");
  if (d.cq * d.G * d.ck > INT32_MAX || d.K * d.G * d.H > INT32_MAX)
    return ffi::Error::InvalidArgument("qedjax_attention: a block exceeds int32");
  return ffi::Error::Success();
}

Dims MakeDims(ffi::AnyBuffer q, ffi::AnyBuffer k, int64_t block_q, int64_t block_k) {
  auto dq = q.dimensions(), dk = k.dimensions();
  Dims d{};
  if (dq.size() != 5 || dk.size() != 4) return d;
  d.B = dq[0], d.T = dq[1], d.K = dq[2], d.G = dq[3], d.H = dq[4], d.S = dk[1];
  d.cq = std::min<int64_t>(block_q, std::max<int64_t>(d.T, 1));
  d.ck = std::min<int64_t>(block_k, std::max<int64_t>(d.S, 1));
  d.nq = d.cq > 0 ? (d.T + d.cq - 1) / d.cq : 0;
  d.nk = d.ck > 0 ? (d.S + d.ck - 1) / d.ck : 0;
  return d;
}

ffi::Error Forward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer q_seg,
                   ffi::AnyBuffer q_slots, ffi::AnyBuffer kv_seg, ffi::AnyBuffer kv_slots,
                   ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse, int64_t block_q,
                   int64_t block_k, int64_t threads) {
  const Dims d = MakeDims(q, k, block_q, block_k);
  if (auto e = Check(d, q, k, v, q_seg, q_slots, kv_seg, kv_slots); e.failure()) return e;
  const Masks mk{static_cast<const int32_t*>(q_seg.untyped_data()), static_cast<const int32_t*>(q_slots.untyped_data()),
                 static_cast<const int32_t*>(kv_seg.untyped_data()), static_cast<const int32_t*>(kv_slots.untyped_data())};
  const float* pq = static_cast<const float*>(q.untyped_data());
  const float* pk = static_cast<const float*>(k.untyped_data());
  const float* pv = static_cast<const float*>(v.untyped_data());
  float* po = static_cast<float*>(out->untyped_data());
  float* pl = static_cast<float*>(lse->untyped_data());
  const int64_t G = d.G, H = d.H, rows = d.cq * G, ld = d.K * H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));

  const int64_t items = d.B * d.K * d.nq;
  std::vector<std::vector<float>> scratch(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
  ParallelFor(items, static_cast<int>(scratch.size()), [&](int64_t item, int worker) {
    const int64_t i = item % d.nq, bk = item / d.nq, b = bk / d.K, kh = bk % d.K;
    const int64_t t0 = i * d.cq, tc = std::min(d.cq, d.T - t0), r = tc * G;
    std::vector<float>& buf = scratch[worker];
    buf.resize(rows * H * 2 + rows * d.ck + rows * 2 + (d.cq * d.ck + 3) / 4);
    float *qp = buf.data(), *o = qp + rows * H, *s = o + rows * H, *m = s + rows * d.ck, *l = m + rows;
    uint8_t* vis = reinterpret_cast<uint8_t*>(l + rows);
    PackRows(d, pq, b, kh, t0, tc, scale, qp);
    std::fill(o, o + r * H, 0.0f);
    std::fill(m, m + r, -INFINITY);
    std::fill(l, l + r, 0.0f);
    for (int64_t j = 0; j < d.nk; ++j) {
      const int64_t s0 = j * d.ck, sc = std::min(d.ck, d.S - s0);
      const Kind kind = PairMask(d, mk, b, t0, tc, s0, sc, vis);
      if (kind == kNone) continue;
      const float* kb = pk + (b * d.S + s0) * ld + kh * H;
      Gemm(false, true, r, sc, H, qp, H, kb, ld, 0.0f, s, sc);  // scores [r, sc]
      for (int64_t row = 0; row < r; ++row) {
        float* sr = s + row * sc;
        const uint8_t* vr = vis + (row / G) * sc;
        const float mx = kind == kAll ? RowMax(sr, nullptr, sc) : RowMax(sr, vr, sc);
        const float m_new = std::max(m[row], mx);
        if (m_new == -INFINITY) {  // this row has seen no key yet: nothing to add
          std::fill(sr, sr + sc, 0.0f);
          continue;
        }
        float sum = 0.0f;
        if (kind == kAll) {
#pragma omp simd reduction(+ : sum)
          for (int64_t c = 0; c < sc; ++c) {
            const float p = Exp(sr[c] - m_new);
            sr[c] = p;
            sum += p;
          }
        } else {
#pragma omp simd reduction(+ : sum)
          for (int64_t c = 0; c < sc; ++c) {
            const float p = vr[c] ? Exp(sr[c] - m_new) : 0.0f;
            sr[c] = p;
            sum += p;
          }
        }
        const float corr = m[row] == -INFINITY ? 0.0f : std::exp(m[row] - m_new);
        if (corr != 1.0f) {
          float* orow = o + row * H;
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) orow[h] *= corr;
        }
        l[row] = l[row] * corr + sum;
        m[row] = m_new;
      }
      Gemm(false, false, r, H, sc, s, sc, pv + (b * d.S + s0) * ld + kh * H, ld, 1.0f, o, H);  // o += p v
    }
    for (int64_t tt = 0; tt < tc; ++tt) {
      float* dst = po + ((b * d.T + t0 + tt) * d.K + kh) * G * H;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = tt * G + g;
        const float inv = l[row] > 0.0f ? 1.0f / l[row] : 0.0f;
        for (int64_t h = 0; h < H; ++h) dst[g * H + h] = o[row * H + h] * inv;
        pl[((b * d.K + kh) * d.T + t0 + tt) * G + g] = l[row] > 0.0f ? m[row] + std::log(l[row]) : 0.0f;
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer q_seg,
                    ffi::AnyBuffer q_slots, ffi::AnyBuffer kv_seg, ffi::AnyBuffer kv_slots, ffi::AnyBuffer out,
                    ffi::AnyBuffer lse, ffi::AnyBuffer d_out, ffi::Result<ffi::AnyBuffer> dq,
                    ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv, int64_t block_q,
                    int64_t block_k, int64_t threads) {
  const Dims d = MakeDims(q, k, block_q, block_k);
  if (auto e = Check(d, q, k, v, q_seg, q_slots, kv_seg, kv_slots); e.failure()) return e;
  if (out.element_count() != q.element_count() || d_out.element_count() != q.element_count() ||
      lse.element_count() != d.B * d.K * d.T * d.G)
    return ffi::Error::InvalidArgument("qedjax_attention: out, d_out or lse has the wrong size");
  const Masks mk{static_cast<const int32_t*>(q_seg.untyped_data()), static_cast<const int32_t*>(q_slots.untyped_data()),
                 static_cast<const int32_t*>(kv_seg.untyped_data()), static_cast<const int32_t*>(kv_slots.untyped_data())};
  const float* pq = static_cast<const float*>(q.untyped_data());
  const float* pk = static_cast<const float*>(k.untyped_data());
  const float* pv = static_cast<const float*>(v.untyped_data());
  const float* po = static_cast<const float*>(out.untyped_data());
  const float* pdo = static_cast<const float*>(d_out.untyped_data());
  const float* pl = static_cast<const float*>(lse.untyped_data());
  float* pdq = static_cast<float*>(dq->untyped_data());
  float* pdk = static_cast<float*>(dk->untyped_data());
  float* pdv = static_cast<float*>(dv->untyped_data());
  const int64_t G = d.G, H = d.H, rows = d.cq * G, ld = d.K * H, GH = G * H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));

  // delta = rowsum(d_out * out), laid out as lse: [B, K, T, G]
  std::vector<float> delta(d.B * d.K * d.T * G);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t t = 0; t < d.T; ++t)
      for (int64_t kh = 0; kh < d.K; ++kh)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t at = ((b * d.T + t) * d.K + kh) * GH + g * H;
          float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
          for (int64_t h = 0; h < H; ++h) acc += pdo[at + h] * po[at + h];
          delta[((b * d.K + kh) * d.T + t) * G + g] = acc;
        }

  // Key blocks in order (the first have the most queries to visit under causal masks).
  const int64_t items = d.B * d.K * d.nk;
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
  // per worker: dQ of every (b, kh) in packed rows [B, K, T x G, H], unscaled
  std::vector<std::vector<float>> dq_acc(workers), scratch(workers);
  ParallelFor(items, workers, [&](int64_t item, int worker) {
    const int64_t j = item / (d.B * d.K), bk = item % (d.B * d.K), b = bk / d.K, kh = bk % d.K;
    const int64_t s0 = j * d.ck, sc = std::min(d.ck, d.S - s0);
    std::vector<float>& acc = dq_acc[worker];
    if (acc.empty()) acc.assign(d.B * d.K * d.T * GH, 0.0f);
    std::vector<float>& buf = scratch[worker];
    buf.resize(sc * H * 2 + rows * H * 2 + rows * sc * 2 + (d.cq * d.ck + 3) / 4);
    float *dkb = buf.data(), *dvb = dkb + sc * H, *qp = dvb + sc * H, *dop = qp + rows * H, *p = dop + rows * H,
          *ds = p + rows * sc;
    uint8_t* vis = reinterpret_cast<uint8_t*>(ds + rows * sc);
    std::fill(dkb, dkb + sc * H * 2, 0.0f);
    const float* kb = pk + (b * d.S + s0) * ld + kh * H;
    const float* vb = pv + (b * d.S + s0) * ld + kh * H;
    for (int64_t i = 0; i < d.nq; ++i) {
      const int64_t t0 = i * d.cq, tc = std::min(d.cq, d.T - t0), r = tc * G;
      const Kind kind = PairMask(d, mk, b, t0, tc, s0, sc, vis);
      if (kind == kNone) continue;
      PackRows(d, pq, b, kh, t0, tc, scale, qp);
      PackRows(d, pdo, b, kh, t0, tc, 1.0f, dop);
      const float* lse_r = pl + ((b * d.K + kh) * d.T + t0) * G;
      const float* delta_r = delta.data() + ((b * d.K + kh) * d.T + t0) * G;
      Gemm(false, true, r, sc, H, qp, H, kb, ld, 0.0f, p, sc);     // scores [r, sc]
      Gemm(false, true, r, sc, H, dop, H, vb, ld, 0.0f, ds, sc);   // dP = dO v^T
      for (int64_t row = 0; row < r; ++row) {
        float *pr = p + row * sc, *dr = ds + row * sc;
        const uint8_t* vr = vis + (row / G) * sc;
        const float lr = lse_r[row], dl = delta_r[row];
        if (kind == kAll) {
#pragma omp simd
          for (int64_t c = 0; c < sc; ++c) {
            const float pc = Exp(pr[c] - lr);
            pr[c] = pc;
            dr[c] = pc * (dr[c] - dl);
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < sc; ++c) {
            const float pc = vr[c] ? Exp(pr[c] - lr) : 0.0f;
            pr[c] = pc;
            dr[c] = pc * (dr[c] - dl);
          }
        }
      }
      Gemm(true, false, sc, H, r, p, sc, dop, H, 1.0f, dvb, H);   // dV += P^T dO
      Gemm(true, false, sc, H, r, ds, sc, qp, H, 1.0f, dkb, H);   // dK += dS^T (q * scale)
      Gemm(false, false, r, H, sc, ds, sc, kb, ld, 1.0f, acc.data() + ((b * d.K + kh) * d.T + t0) * GH, H);  // dQ / scale
    }
    for (int64_t ss = 0; ss < sc; ++ss) {
      std::memcpy(pdk + (b * d.S + s0 + ss) * ld + kh * H, dkb + ss * H, sizeof(float) * H);
      std::memcpy(pdv + (b * d.S + s0 + ss) * ld + kh * H, dvb + ss * H, sizeof(float) * H);
    }
  });
  // dq = scale * (sum of the workers' buffers), unpacked to [B, T, K, G, H]
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t kh = 0; kh < d.K; ++kh)
      for (int64_t t = 0; t < d.T; ++t) {
        float* dst = pdq + ((b * d.T + t) * d.K + kh) * GH;
        const int64_t at = ((b * d.K + kh) * d.T + t) * GH;
        std::fill(dst, dst + GH, 0.0f);
        for (auto& acc : dq_acc) {
          if (acc.empty()) continue;
#pragma omp simd
          for (int64_t x = 0; x < GH; ++x) dst[x] += acc[at + x];
        }
#pragma omp simd
        for (int64_t x = 0; x < GH; ++x) dst[x] *= scale;
      }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QedjaxAttentionFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QedjaxAttentionBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k")
                                  .Attr<int64_t>("threads"));
