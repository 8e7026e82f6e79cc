using System.Text;
using SparseAttention.Cli;
using SparseAttention.Model;
using SparseAttention.Training;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

public sealed class CliSampleTests : TrainedModelTestBase
{
    /// <summary>Records every write separately, to see that text arrives in pieces (streamed), not at the end.</summary>
    private sealed class ChunkWriter : StringWriter
    {
        public int Writes { get; private set; }
        public int Flushes { get; private set; }
        public override void Write(char value) { Writes++; base.Write(value); }
        public override void Write(char[] buffer, int index, int count) { Writes++; base.Write(buffer, index, count); }
        public override void Write(string? value) { Writes++; base.Write(value); }
        public override void Flush() { Flushes++; base.Flush(); }
    }

    [Fact]
    public void Sampling_is_reproducible_under_a_seed_and_streams_the_final_text()
    {
        string checkpoint = TrainCheckpoint();
        string[] Args(string seed) => ["sample", "--checkpoint", RunDir, "--prompt", "The quick", "--max-new-tokens", "24",
            "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", seed];
        var first = CliRunner.Run(Args("7"));
        Assert.True(first.Code == 0, first.Err);
        Assert.Equal(first.Out, CliRunner.Run(Args("7")).Out);
        Assert.NotEqual(first.Out, CliRunner.Run(Args("8")).Out);
        Assert.Contains("sampled 24 bytes", first.Err);

        // The streamed text is the prompt plus the UTF-8 decoding of exactly the tokens Generate returns.
        long[] tokens;
        using (var trainer = Load(checkpoint))
        {
            var prompt = tensor(Encoding.UTF8.GetBytes("The quick").Select(b => (long)b).ToArray(), new long[] { 1, 9 });
            var model = trainer.Model;
            tokens = Sampling.Generate(model, prompt, 24, MicroConfig.MaxSeqLen, w => model.forward(w, null).Logits,
                0.9, 40, 0.95, seed: 7).data<long>().ToArray();
        }
        string expected = "The quick" + new UTF8Encoding(false, false).GetString(tokens.Select(t => (byte)t).ToArray()) + Environment.NewLine;
        Assert.Equal(expected, first.Out);

        var stdout = new ChunkWriter();
        Assert.Equal(0, CliApp.Run(Args("7"), stdout, new StringWriter()));
        Assert.Equal(first.Out, stdout.ToString());
        Assert.True(stdout.Writes >= 10 && stdout.Flushes >= 10, $"{stdout.Writes} writes, {stdout.Flushes} flushes: not streamed");
    }

    [Fact]
    public void Generate_callback_sees_every_token_in_order()
    {
        random.manual_seed(1);
        using var model = new RoutingTransformerLM(MicroConfig);
        var seen = new List<long>();
        var result = Sampling.Generate(model, tensor(new long[] { 84, 104 }, new long[] { 1, 2 }), 30, MicroConfig.MaxSeqLen,
            w => model.forward(w, null).Logits, seed: 3, onToken: next => seen.Add(next[0].item<long>()));
        Assert.Equal(result.data<long>().ToArray(), seen);
        Assert.Equal(30, seen.Count);                                   // more than max_seq_len: the window slides
    }

    [Fact]
    public void Prompt_comes_from_stdin_without_prompt_and_greedy_is_deterministic()
    {
        TrainCheckpoint();
        SampleCommand.InputOverride = new StringReader("Fellow citizens");
        try
        {
            var fromStdin = CliRunner.Run("sample", "--checkpoint", RunDir, "--max-new-tokens", "8", "--temperature", "0");
            Assert.True(fromStdin.Code == 0, fromStdin.Err);
            var direct = CliRunner.Run("sample", "--checkpoint", RunDir, "--max-new-tokens", "8", "--temperature", "0", "--prompt", "Fellow citizens", "--seed", "5");
            Assert.StartsWith("Fellow citizens", fromStdin.Out);
            Assert.Equal(fromStdin.Out, direct.Out);                      // greedy: the seed does not matter
        }
        finally { SampleCommand.InputOverride = null; }
    }

    [Fact]
    public void Safetensors_weights_sample_the_same_text_as_the_checkpoint()
    {
        string checkpoint = TrainCheckpoint();
        string weights = Path.Combine(Dir, "w.safetensors");
        Assert.Equal(0, CliRunner.Run("export", "--checkpoint", checkpoint, "--out", weights).Code);
        string[] common = ["--prompt", "Senate", "--max-new-tokens", "12", "--seed", "11"];
        var a = CliRunner.Run(["sample", "--checkpoint", checkpoint, .. common]);
        var b = CliRunner.Run(["sample", "--checkpoint", weights, .. common]);
        Assert.True(b.Code == 0, b.Err);
        Assert.Equal(a.Out, b.Out);
    }

    [Theory]
    [InlineData("--temperature", "-0.5", "--temperature must be finite and >= 0")]
    [InlineData("--top-p", "0", "--top-p must be in (0, 1], got 0")]
    [InlineData("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5")]
    [InlineData("--top-k", "0", "--top-k must be >= 1, got 0")]
    [InlineData("--max-new-tokens", "0", "--max-new-tokens must be in [1, 1000000], got 0")]
    [InlineData("--max-new-tokens", "1000001", "--max-new-tokens must be in [1, 1000000], got 1000001")]
    [InlineData("--prompt", "0123456789abcdefg", "--prompt: 17 bytes is longer than the model's context (max_seq_len = 16 bytes)")]
    [InlineData("--prompt", "", "--prompt: the prompt is empty")]
    [InlineData("--checkpoint", "missing", "--checkpoint: no such file or folder")]
    [InlineData("--checkpoint", "emptydir", "holds no checkpoint (ckpt-*.sat) and no model.safetensors")]
    public void Bad_input_gives_one_clear_line_and_exit_2(string option, string value, string expected)
    {
        TrainCheckpoint();
        Directory.CreateDirectory(Path.Combine(Dir, "emptydir"));
        var args = new List<string> { "sample", "--checkpoint", RunDir, "--prompt", "The" };
        if (option == "--checkpoint") args[2] = Path.Combine(Dir, value);
        else if (option == "--prompt") args[4] = value;
        else args.AddRange([option, value]);
        AssertUsageError(CliRunner.Run(args.ToArray()), expected);
    }

    [Fact]
    public void A_corrupt_checkpoint_is_reported_without_a_trace()
    {
        string checkpoint = TrainCheckpoint();
        var bytes = File.ReadAllBytes(checkpoint);
        bytes[bytes.Length / 2] ^= 0x10;
        File.WriteAllBytes(checkpoint, bytes);
        var (code, _, stderr) = CliRunner.Run("sample", "--checkpoint", checkpoint, "--prompt", "The");
        Assert.Equal(CliApp.Failure, code);
        Assert.Contains("corrupt", stderr);
        Assert.Single(stderr.Trim().Split('\n'));
        string junk = Path.Combine(Dir, "junk.bin");
        File.WriteAllText(junk, "hello, not weights");
        (code, _, stderr) = CliRunner.Run("sample", "--checkpoint", junk, "--prompt", "The");
        Assert.Equal(CliApp.Failure, code);
        Assert.Contains("neither a sparse-attn checkpoint nor a valid safetensors file", stderr);
    }
}
