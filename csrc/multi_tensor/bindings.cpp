// Bindings of the multi-tensor planner (multi_tensor/multi_tensor.h): its chunk tables
// are exposed so their logic (including > 2^31-element tensors) is tested without a GPU.
#include "common/bindings.h"
#include "multi_tensor/multi_tensor.h"

namespace fastmaml {
namespace bind {

void register_multi_tensor(py::module_& m) {
  m.def("multi_tensor_plan",
        [](const std::vector<std::int64_t>& cols, std::int64_t rows, std::int64_t col_chunk, std::int64_t row_chunk,
           int max_tensors, int max_blocks) {
          MultiTensorPlan p = plan_multi_tensor(cols, rows, col_chunk, row_chunk, max_tensors, max_blocks);
          py::list launches;
          for (const LaunchPlan& l : p.launches) {
            py::dict d;
            d["tensors"] = l.tensors;
            d["block_slot"] = l.block_slot;
            d["block_col"] = l.block_col;
            d["block_row"] = l.block_row;
            d["first_block"] = l.first_block;
            launches.append(d);
          }
          py::dict out;
          out["launches"] = launches;
          out["tensor_first_block"] = p.tensor_first_block;
          out["tensor_blocks"] = p.tensor_blocks;
          out["total_blocks"] = p.total_blocks;
          out["needs_index64"] = p.needs_index64;
          return out;
        },
        py::arg("cols"), py::arg("rows"), py::arg("col_chunk"), py::arg("row_chunk"), py::arg("max_tensors"),
        py::arg("max_blocks"));
}

}  // namespace bind
}  // namespace fastmaml
