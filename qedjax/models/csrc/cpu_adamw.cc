// qedjax's CPU AdamW step: one XLA FFI handler that updates every fp32 parameter and both Adam moments
// in a single pass, in place (issue 22).
//
// XLA keeps the moment update and the parameter update of `optim.make_optimizer`'s `apply` in separate
// fusions (the parameter update must not read a moment after its donated buffer was overwritten), so
// the step reads the gradient and moments twice: ~40 bytes per parameter. Here each element is read
// once (p, g, mu, nu: 16 bytes) and written once (p, mu, nu: 12 bytes), in one loop the compiler
// vectorizes, over contiguous chunks spread across `threads` threads.
//
// Operands: `scalars` f32[5] = (ok, grad_scale, bc1, bc2, step_size), then n parameters, n gradients,
// n first moments and n second moments (all fp32, each gradient and moment the shape of its
// parameter); results: the n new parameters, first and second moments, aliased to their inputs by the
// caller. Per element, in the order of qedjax.optim's `apply` (and optax's adamw):
//   g' = g * grad_scale;  mu' = (1 - b1) g' + b1 mu;  nu' = (1 - b2) g'^2 + b2 nu
//   u = (mu' / bc1) / (sqrt(nu' / bc2) + eps) + weight_decay p;  p' = p + step_size u
// and where ok == 0 (a non-finite step), everything unchanged. `weight_decay` applies to every
// parameter of one call (the caller makes one call for decayed and one for undecayed parameters).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Leaf {
  float *p, *mu, *nu;            // results (the same buffers as the inputs when aliased)
  const float *p0, *g, *mu0, *nu0;  // inputs
  int64_t size;
};

struct Coeffs {
  float scale, bc1, bc2, step, b1, b2, one_minus_b1, one_minus_b2, eps, wd;
};

// Elements [lo, hi) of one leaf. The reads and writes may be the same buffers (no __restrict): each
// element is read before it is written and no other element is touched, which `omp simd` asserts.
void Update(const Leaf& x, int64_t lo, int64_t hi, const Coeffs& c) {
  float* p = x.p;
  float* mu = x.mu;
  float* nu = x.nu;
  const float* p0 = x.p0;
  const float* g0 = x.g;
  const float* mu0 = x.mu0;
  const float* nu0 = x.nu0;
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    const float g = g0[i] * c.scale;
    const float m = c.one_minus_b1 * g + c.b1 * mu0[i];
    const float v = c.one_minus_b2 * (g * g) + c.b2 * nu0[i];
    const float w = p0[i];
    float u = (m / c.bc1) / (std::sqrt(v / c.bc2) + c.eps);
    u = u + c.wd * w;
    mu[i] = m;
    nu[i] = v;
    p[i] = w + c.step * u;
  }
}

ffi::Error AdamW(ffi::AnyBuffer scalars, ffi::RemainingArgs args, ffi::RemainingRets rets, float b1, float b2,
                 float one_minus_b1, float one_minus_b2, float eps, float weight_decay, int64_t threads) {
  if (scalars.element_type() != ffi::F32 || scalars.element_count() != 5)
    return ffi::Error::InvalidArgument("qedjax_adamw: scalars must be f32[5]");
  if (args.size() % 4 != 0 || rets.size() * 4 != args.size() * 3)
    return ffi::Error::InvalidArgument("qedjax_adamw: takes 4n operands (p, g, mu, nu) and gives 3n results");
  const int64_t n = static_cast<int64_t>(args.size() / 4);
  std::vector<Leaf> leaves(n);
  for (int64_t j = 0; j < n; ++j) {
    ffi::AnyBuffer in[4] = {*args.get<ffi::AnyBuffer>(j), *args.get<ffi::AnyBuffer>(n + j),
                            *args.get<ffi::AnyBuffer>(2 * n + j), *args.get<ffi::AnyBuffer>(3 * n + j)};
    ffi::Result<ffi::AnyBuffer> out[3] = {*rets.get<ffi::AnyBuffer>(j), *rets.get<ffi::AnyBuffer>(n + j),
                                          *rets.get<ffi::AnyBuffer>(2 * n + j)};
    const int64_t size = static_cast<int64_t>(in[0].element_count());
    for (auto& b : in)
      if (b.element_type() != ffi::F32 || static_cast<int64_t>(b.element_count()) != size)
        return ffi::Error::InvalidArgument("qedjax_adamw: a parameter, its gradient and moments must be f32 of one size");
    for (auto& b : out)
      if (b->element_type() != ffi::F32 || static_cast<int64_t>(b->element_count()) != size)
        return ffi::Error::InvalidArgument("qedjax_adamw: results must match their parameters");
    leaves[j] = Leaf{static_cast<float*>(out[0]->untyped_data()), static_cast<float*>(out[1]->untyped_data()),
                     static_cast<float*>(out[2]->untyped_data()), static_cast<const float*>(in[0].untyped_data()),
                     static_cast<const float*>(in[1].untyped_data()), static_cast<const float*>(in[2].untyped_data()),
                     static_cast<const float*>(in[3].untyped_data()), size};
  }
  const float* s = static_cast<const float*>(scalars.untyped_data());
  if (s[0] == 0.0f) {  // a skipped step: the results are the inputs (already, where aliased)
    for (const Leaf& x : leaves) {
      const size_t bytes = sizeof(float) * x.size;
      if (x.p != x.p0) std::memcpy(x.p, x.p0, bytes);
      if (x.mu != x.mu0) std::memcpy(x.mu, x.mu0, bytes);
      if (x.nu != x.nu0) std::memcpy(x.nu, x.nu0, bytes);
    }
    return ffi::Error::Success();
  }
  const Coeffs c{s[1], s[2], s[3], s[4], b1, b2, one_minus_b1, one_minus_b2, eps, weight_decay};
  int64_t total = 0;
  for (const Leaf& x : leaves) total += x.size;
  // Equal shares of all the elements (the leaves end to end), cut at multiples of 16 elements; an
  // update of fewer than 2^16 elements a thread stays on one.
  constexpr int64_t kMinPerThread = 1 << 16;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, total / kMinPerThread));
  auto cut = [&](int64_t w) { return w == workers ? total : (total * w / workers) & ~int64_t{15}; };
  auto work = [&](int64_t w) {
    const int64_t begin = cut(w), end = cut(w + 1);
    int64_t offset = 0;
    for (const Leaf& x : leaves) {
      const int64_t lo = std::max(begin, offset), hi = std::min(end, offset + x.size);
      if (lo < hi) Update(x, lo - offset, hi - offset, c);
      offset += x.size;
    }
  };
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < workers; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& t : pool) t.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QedjaxAdamW, AdamW,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay")
                                  .Attr<int64_t>("threads"));
