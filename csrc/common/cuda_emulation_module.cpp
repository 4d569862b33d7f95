// Python view of the CUDA emulation (FASTMAML_CUDA=emulate build): the per-kernel launch
// counters (the coverage list), the runtime-call counters (capture safety), the race-check switch, the scheduler's seed and the
// emulator's own test kernels. extension.cpp calls register_cuda_emulation(m) in that
// build only.
#if defined(FASTMAML_CUDA_EMULATE)
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cuda_emulation_stats.h"

namespace py = pybind11;

namespace fastmaml {

void register_cuda_emulation(py::module_& m) {
  m.attr("cuda_emulated") = true;
  m.def("cuda_emulation_stats", []() {
    py::dict out;
    for (const emu::KernelStats& s : emu::stats_snapshot()) {
      py::dict d;
      d["launches"] = s.launches;
      d["refused"] = s.refused;
      d["failed"] = s.failed;
      d["blocks"] = s.blocks;
      d["threads"] = s.threads;
      d["barriers"] = s.barriers;
      d["warp_ops"] = s.warp_ops;
      d["shared_accesses"] = s.shared_accesses;
      d["global_accesses"] = s.global_accesses;
      d["races"] = s.races;
      d["variants"] = s.variants;
      out[py::str(s.name)] = d;
    }
    return out;
  }, "per-kernel counters of the emulated launches since the last reset: {kernel name: {launches, refused, "
     "failed, blocks, threads, barriers, warp_ops, shared_accesses, global_accesses, races, variants}}");
  m.def("cuda_emulation_reset", &emu::reset_stats, "clears the per-kernel counters");
  m.def("cuda_emulation_api_stats", []() {
    const emu::ApiStats s = emu::api_snapshot();
    py::dict d;
    d["mallocs"] = s.mallocs;
    d["frees"] = s.frees;
    d["memcpy_sync"] = s.memcpy_sync;
    d["memcpy_device_to_host"] = s.memcpy_device_to_host;
    d["memsets"] = s.memsets;
    d["stream_syncs"] = s.stream_syncs;
    d["device_syncs"] = s.device_syncs;
    return d;
  }, "counts of the allocating and synchronising runtime calls since the last reset: {mallocs, frees, "
     "memcpy_sync, memcpy_device_to_host, memsets, stream_syncs, device_syncs}");
  m.def("cuda_emulation_api_reset", &emu::reset_api_stats, "clears the runtime-call counters");
  m.def("cuda_emulation_set_race_check", &emu::set_race_check, py::arg("on"),
        "turns the shared/global-memory race check of emulated launches on (default) or off");
  m.def("cuda_emulation_race_check", &emu::race_check_enabled);
  m.def("cuda_emulation_set_seed", &emu::set_seed, py::arg("seed"),
        "seeds the scheduler's block and thread orders (default: FASTMAML_EMU_SEED, else random)");
  m.def("cuda_emulation_seed", &emu::current_seed);
  m.def("cuda_emulation_selftest", &emu::selftest, py::arg("name"), py::arg("a") = 0, py::arg("b") = 0,
        py::arg("n0") = 0, py::arg("n1") = 0, py::arg("n2") = 0, py::arg("n3") = 0, py::arg("n4") = 0,
        py::arg("n5") = 0, py::arg("n6") = 0, py::arg("flag") = false,
        "runs one of the emulator's test kernels; returns its launch error message ('' = success)");
}

}  // namespace fastmaml
#endif  // FASTMAML_CUDA_EMULATE
