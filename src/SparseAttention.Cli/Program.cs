return SparseAttention.Cli.CliApp.Run(args, Console.Out, Console.Error);
