// The panel layout of the packed CPU kernels (cbq_cpu.cpp, amx_cpu.cpp), built by `repack` from the on-disk
// layout at first use, never saved:
//   * every group of `glen` codes is padded with zero codes to Gp = roundup(glen, 64) codes (Kp = G * Gp), rows are
//     padded with zero rows to Np = roundup(N, 8); a "chunk" is 64 consecutive codes of one row;
//   * a chunk takes CB = 64 * slot / 8 bytes: int4 (slot 4, also 3-bit codes): code c in byte c % 32, nibble c / 32;
//     int2: code c in byte c % 16, bits 2 * (c / 16); int8: code c in byte c. So the low nibbles of a 32-byte int4
//     chunk are codes 0..31 in order and the high nibbles codes 32..63 (the llama.cpp q4 order);
//   * the chunks of 8 consecutive rows are interleaved, and each run of kMetaGroups = 8 groups is preceded by their
//     scales and zero points: wpack = [Np / 8][ceil(G / 8)][meta, codes], meta = 192 bytes (scales fp16 [8 groups]
//     [8 rows], then zeros uint8 [8 groups][8 rows]; unused slots of the last run are zero), codes = [groups of the
//     run][Gp / 64 chunks][8 rows][CB]. One panel of eight output rows is one sequential stream with everything it
//     needs: separate scale and zero arrays would be two more streams per panel, ~10% of a cold W4 GEMV.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>

#include "cpu_common.h"

#include <cstdint>
#include <optional>

namespace {

constexpr int64_t kRows = 8;    // output rows per panel
constexpr int64_t kChunk = 64;  // codes per chunk
constexpr int64_t kMetaGroups = 8;  // groups per meta block (scales and zeros inside the weight stream)
constexpr int64_t kMetaBytes = kMetaGroups * kRows * 3;  // fp16 scales + uint8 zeros of kMetaGroups groups

struct Geometry {
  int64_t K, N, Np, glen, G, Gp, Kp, CB;
  int slot;

  Geometry(int64_t K_, int64_t N_, int64_t glen_, int slot_) : K(K_), N(N_), glen(glen_), slot(slot_) {
    TORCH_CHECK(slot == 2 || slot == 4 || slot == 8, "slot bits must be 2, 4 or 8");
    TORCH_CHECK(glen > 0 && K > 0 && N > 0, "empty geometry");
    Np = (N + kRows - 1) / kRows * kRows;
    G = (K + glen - 1) / glen;
    Gp = (glen + kChunk - 1) / kChunk * kChunk;
    Kp = G * Gp;
    CB = kChunk * slot / 8;
  }
  int64_t panels() const { return Np / kRows; }
  int64_t chunks_per_group() const { return Gp / kChunk; }
  int64_t meta_runs() const { return (G + kMetaGroups - 1) / kMetaGroups; }
  int64_t group_bytes() const { return chunks_per_group() * kRows * CB; }
  int64_t panel_bytes() const { return meta_runs() * kMetaBytes + G * group_bytes(); }
  // Offset inside a panel of group gi's first chunk, and of the meta block of the run holding it.
  int64_t group_offset(int64_t gi) const { return (gi / kMetaGroups + 1) * kMetaBytes + gi * group_bytes(); }
  int64_t meta_offset(int64_t gi) const { return (gi / kMetaGroups) * (kMetaBytes + kMetaGroups * group_bytes()); }
};

// Scales (fp16) and zero points (uint8) of group gi's eight rows, inside the meta block that starts at `meta`.
inline const at::Half* meta_scales(const uint8_t* meta, int64_t gi) {
  return reinterpret_cast<const at::Half*>(meta) + (gi % kMetaGroups) * kRows;
}
inline const uint8_t* meta_zeros(const uint8_t* meta, int64_t gi) {
  return meta + kMetaGroups * kRows * 2 + (gi % kMetaGroups) * kRows;
}

// Byte and bit offset of code c (0..63) inside a chunk (see the layout above).
inline void code_position(int slot, int c, int& byte, int& shift) {
  if (slot == 4) {
    byte = c % 32; shift = 4 * (c / 32);
  } else if (slot == 2) {
    byte = c % 16; shift = 2 * (c / 16);
  } else {
    byte = c; shift = 0;
  }
}

// The checked geometry and raw pointers of panel weights (wpack, see above) and their optional float bias [N].
struct PanelWeights {
  Geometry g;
  const uint8_t* w;
  const float* bias;
};

inline PanelWeights panel_weights(int64_t K, const at::Tensor& wpack, const std::optional<at::Tensor>& bias,
                                  int64_t slot, int64_t N, int64_t glen) {
  const Geometry g(K, N, glen, static_cast<int>(slot));
  check_cpu(wpack, "wpack");
  TORCH_CHECK(wpack.scalar_type() == at::kByte && wpack.numel() == g.panels() * g.panel_bytes(),
              "wpack does not match the panel layout");
  return {g, wpack.data_ptr<uint8_t>(), bias_data(bias, N)};
}

}  // namespace
