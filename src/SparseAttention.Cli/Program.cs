// First, before libtorch allocates anything: large tensors on transparent huge pages (unless the user set the variable).
SparseAttention.TorchAllocator.EnableTransparentHugePages();
return SparseAttention.Cli.CliApp.Run(args, Console.Out, Console.Error);
