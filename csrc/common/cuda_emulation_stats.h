// What the CUDA emulation (cuda_emulation.cpp) reports to Python: per-kernel launch
// counters (the coverage list of tests/emulated), the race checker's counters and the
// counts of allocating and synchronising runtime calls. Plain
// C++: included by the pybind11 registration without the emulation macros.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace fastmaml {
namespace emu {

struct KernelStats {
  std::string name;                         // the kernel's name (template arguments dropped)
  std::map<std::string, uint64_t> variants;  // launches per instantiation (mangled kernel type)
  uint64_t launches = 0;  // launches that ran
  uint64_t refused = 0;   // launches refused by the device limits
  uint64_t failed = 0;    // launches that ran and reported an error (race, barrier, ...)
  uint64_t blocks = 0;
  uint64_t threads = 0;
  uint64_t barriers = 0;          // __syncthreads() releases
  uint64_t warp_ops = 0;          // warp collectives released
  uint64_t shared_accesses = 0;   // loads/stores of shared memory seen by the race check
  uint64_t global_accesses = 0;   // loads/stores of global memory seen by the race check
  uint64_t races = 0;
};

// Runtime calls that break CUDA-graph capture or allocate (the capture-safety test of
// tests/emulated/test_capture_safety.py counts them around each op's launch).
struct ApiStats {
  uint64_t mallocs = 0;               // cudaMalloc / cudaMallocAsync
  uint64_t frees = 0;                 // cudaFree / cudaFreeAsync
  uint64_t memcpy_sync = 0;           // cudaMemcpy (synchronous)
  uint64_t memcpy_device_to_host = 0; // any copy of kind DeviceToHost (or Default), sync or async
  uint64_t memsets = 0;               // cudaMemset / cudaMemsetAsync
  uint64_t stream_syncs = 0;          // cudaStreamSynchronize
  uint64_t device_syncs = 0;          // cudaDeviceSynchronize
};

std::vector<KernelStats> stats_snapshot();
void reset_stats();
ApiStats api_snapshot();
void reset_api_stats();
void set_race_check(bool on);
bool race_check_enabled();
void set_seed(uint64_t seed);
uint64_t current_seed();

// Runs one of the emulator's own test kernels (cuda_emulation_selftest.cu); returns the
// launch's error message, '' when it succeeded.
std::string selftest(const std::string& name, std::uintptr_t a, std::uintptr_t b, int64_t n0, int64_t n1,
                     int64_t n2, int64_t n3, int64_t n4, int64_t n5, int64_t n6, bool flag);

}  // namespace emu
}  // namespace fastmaml
