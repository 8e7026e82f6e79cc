// First, before libtorch allocates anything: large tensors on transparent huge pages (unless the user set the variable).
SparseAttention.TorchAllocator.EnableTransparentHugePages();
// Freed tensors' memory stays mapped for the next step's tensors (unless SPARSE_ATTN_RETAIN_FREED_MEMORY=0).
SparseAttention.TorchAllocator.RetainFreedMemory();
// Idle OpenMP workers spin only briefly on cores the attention kernels' threads need (unless the user chose).
SparseAttention.TorchThreads.LimitSpinWaits();
// Then, before the first matrix product: MKL picks its float32 kernels by the CPU's instruction sets, not its vendor.
SparseAttention.MklDispatch.UseCpuFeatures();
return SparseAttention.Cli.CliApp.Run(args, Console.Out, Console.Error);
