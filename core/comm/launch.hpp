// Multi-process launch: one process per GPU, started by an existing launcher (torchrun, mpirun,
// srun). Reads the launcher's environment and exchanges the NCCL unique id over TCP, from rank 0
// at MASTER_ADDR to everyone else.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>

namespace tpe::comm {

struct LaunchEnv {
  int rank = 0;
  int world = 1;
  int local_rank = 0;       // which GPU of this host
  std::string master_addr;  // rank 0's host
  int rendezvous_port = 0;  // MASTER_PORT + 1 (torchrun's own store holds MASTER_PORT)
  std::string launcher;     // "torchrun", "Open MPI", "Slurm"
};

// The launch this process belongs to, if a launcher started it with more than one process:
// torchrun (RANK, WORLD_SIZE, LOCAL_RANK), Open MPI (OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK) or
// Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), with MASTER_ADDR and MASTER_PORT (which
// torchrun sets and mpirun/srun users export). tpe::Error naming the variable when one is missing
// or malformed.
std::optional<LaunchEnv> launch_env_from_environment();

// Rank 0 sends `id` to every other rank; the others receive it. Gives up with a tpe::Error naming
// the address after timeout_s.
void exchange_id(const LaunchEnv& env, std::array<char, 128>& id, double timeout_s = 120);

}  // namespace tpe::comm
