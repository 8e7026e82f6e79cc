using System.Text;
using System.Text.Json;
using SparseAttention.Cli;
using SparseAttention.Model;
using SparseAttention.Training;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>The tokenizers themselves: names, vocabulary sizes, byte-exact round trips, the byte table against the
/// library's own decoder, piecewise encoding, configuration binding.</summary>
public sealed class TokenizerTests
{
    private static readonly string Mixed =
        "Fellow citizens of the Senate!\n\nThe year 1790 — “quoted” text, naïve café, 中文, emoji 🎉.\r\n  indented\n\t'tis 12345678 <|endoftext|> end\n";

    [Theory]
    [InlineData(TokenizerKind.Bytes, "bytes", 256)]
    [InlineData(TokenizerKind.Gpt2, "gpt2", 50257)]
    [InlineData(TokenizerKind.Cl100k, "cl100k", 100277)]
    public void Names_and_vocabulary_sizes(TokenizerKind kind, string name, int vocabulary)
    {
        var tokenizer = TextTokenizer.For(kind);
        Assert.Equal(kind, tokenizer.Kind);
        Assert.Equal(name, tokenizer.Name);
        Assert.Equal(vocabulary, tokenizer.VocabularySize);
        Assert.Equal(kind, TextTokenizer.Parse(name.ToUpperInvariant()));
        Assert.Same(tokenizer, TextTokenizer.For(kind));                                  // shared, loaded once
        Assert.Equal(["bytes", "gpt2", "cl100k"], TextTokenizer.Names);
    }

    [Theory]
    [InlineData(TokenizerKind.Bytes)]
    [InlineData(TokenizerKind.Gpt2)]
    [InlineData(TokenizerKind.Cl100k)]
    public void Encode_then_decode_gives_back_the_exact_bytes(TokenizerKind kind)
    {
        var tokenizer = TextTokenizer.For(kind);
        var bytes = Encoding.UTF8.GetBytes(Mixed);
        var ids = tokenizer.Encode(Mixed);
        Assert.All(ids, id => Assert.InRange(id, 0, tokenizer.VocabularySize - 1));
        Assert.Equal(bytes, tokenizer.DecodeBytes(ids));
        Assert.Equal(Mixed, tokenizer.Decode(ids));
        Assert.Equal(bytes.Length, ids.Sum(tokenizer.ByteLength));
        if (kind == TokenizerKind.Bytes) Assert.Equal(bytes.Select(b => (int)b), ids);
        else Assert.True(ids.Length < bytes.Length / 2, $"{ids.Length} BPE tokens for {bytes.Length} bytes");
        Assert.Empty(tokenizer.Encode(""));
    }

    /// <summary>Ids every user of these vocabularies knows (tiktoken): the table and the encoder agree on them.</summary>
    [Fact]
    public void Known_ids_of_the_published_vocabularies()
    {
        var gpt2 = TextTokenizer.For(TokenizerKind.Gpt2);
        Assert.Equal([31373, 995], gpt2.Encode("hello world"));
        Assert.Equal("!"u8.ToArray(), gpt2.TokenBytes(0).ToArray());
        Assert.Equal("<|endoftext|>", gpt2.Decode([50256]));
        var cl100k = TextTokenizer.For(TokenizerKind.Cl100k);
        Assert.Equal([15339, 1917], cl100k.Encode("hello world"));
        Assert.Equal("<|endoftext|>", cl100k.Decode([100257]));
        Assert.Equal(0, cl100k.ByteLength(100256));                                      // an id cl100k leaves unused
        // Special-token text in the data may become the special id; its bytes are that text, so decoding stays exact.
        Assert.Equal("a <|endoftext|> b"u8.ToArray(), gpt2.DecodeBytes(gpt2.Encode("a <|endoftext|> b")));
        Assert.Equal("a <|endoftext|> b"u8.ToArray(), cl100k.DecodeBytes(cl100k.Encode("a <|endoftext|> b")));
    }

    /// <summary>The bytes of every id (read from the data package's vocabulary file) decode to exactly the text the
    /// library's own decoder gives for that id — wherever those bytes are whole UTF-8 characters.</summary>
    [Theory]
    [InlineData(TokenizerKind.Gpt2)]
    [InlineData(TokenizerKind.Cl100k)]
    public void Byte_table_agrees_with_the_library_decoder_for_every_id(TokenizerKind kind)
    {
        var tokenizer = TextTokenizer.For(kind);
        var strict = new UTF8Encoding(false, true);
        int checkedIds = 0;
        for (int id = 0; id < tokenizer.VocabularySize; id++)
        {
            var bytes = tokenizer.TokenBytes(id).ToArray();
            if (bytes.Length == 0) continue;
            string text;
            try { text = strict.GetString(bytes); }
            catch (DecoderFallbackException) { continue; }                             // part of a character: no string to compare
            Assert.True(text == tokenizer.LibraryDecode([id]), $"id {id}: table '{text}' vs library '{tokenizer.LibraryDecode([id])}'");
            checkedIds++;
        }
        Assert.True(checkedIds > tokenizer.VocabularySize * 9 / 10, $"only {checkedIds} ids checked");
    }

    /// <summary>Encoding in pieces (cut after a newline followed by a letter or digit) gives the ids of the whole text.</summary>
    [Theory]
    [InlineData(TokenizerKind.Gpt2)]
    [InlineData(TokenizerKind.Cl100k)]
    public void Tokenizing_in_pieces_equals_encoding_the_whole_text(TokenizerKind kind)
    {
        var tokenizer = TextTokenizer.For(kind);
        var text = Encoding.UTF8.GetBytes(string.Concat(Enumerable.Repeat(Mixed + "a.\n\nB\n 7\n8x\n\n\n9 ,\nword\r\nZ\n.\nQ x\nR é\nS\u00a0\nT", 5)));
        int previous = TextTokenizer.PieceBytes;
        try
        {
            TextTokenizer.PieceBytes = 3;
            var pieces = tokenizer.Tokenize(text);
            Assert.True(pieces.Length > 0);
            var whole = tokenizer.Encode(text);
            Assert.Equal(whole.Length, pieces.Length);
            for (int i = 0; i < whole.Length; i++) Assert.Equal(whole[i], pieces[i]);
            Assert.Equal(text.Length, pieces.ByteCount);
        }
        finally { TextTokenizer.PieceBytes = previous; }
    }

    [Fact]
    public void Byte_text_is_a_view_of_its_bytes()
    {
        var bytes = Encoding.UTF8.GetBytes(Mixed);
        TokenText text = bytes;
        Assert.Same(TextTokenizer.For(TokenizerKind.Bytes), text.Tokenizer);
        Assert.Equal(bytes.Length, text.Length);
        Assert.Equal(bytes.Length, text.ByteCount);
        Assert.Equal(bytes[7], text[7]);
        Assert.Equal(1, text.ByteLength(7));
        var tokenized = TextTokenizer.For(TokenizerKind.Bytes).Tokenize(bytes);
        Assert.Equal(bytes.Length, tokenized.Length);
    }

    [Fact]
    public void Bad_names_and_ids_are_refused_with_the_choices()
    {
        var e = Assert.Throws<ArgumentException>(() => TextTokenizer.Parse("gpt3"));
        Assert.Equal("tokenizer", e.ParamName);
        Assert.Contains("unknown tokenizer 'gpt3'; expected one of bytes, gpt2, cl100k", e.Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => TextTokenizer.For(TokenizerKind.Gpt2).ByteLength(50257));
        Assert.Throws<ArgumentOutOfRangeException>(() => TextTokenizer.For(TokenizerKind.Bytes).ByteLength(-1));
        var ids = Assert.Throws<ArgumentException>(() => TokenText.FromIds([1, 256], TextTokenizer.For(TokenizerKind.Bytes)));
        Assert.Contains("must be in [0, 256), got 256", ids.Message);
    }

    /// <summary>The configuration records the tokenizer by name; configurations of earlier versions (no key) read as bytes.</summary>
    [Fact]
    public void Configuration_key_binds_by_name_and_defaults_to_bytes()
    {
        Assert.Equal(TokenizerKind.Bytes, ConfigBinding.FromJson("{\"num_tokens\": 256}", "old").Tokenizer);
        Assert.Contains("\"tokenizer\": \"gpt2\"", ConfigBinding.ToJson(new TransformerConfig { Tokenizer = TokenizerKind.Gpt2 }));
        Assert.Equal(TokenizerKind.Cl100k, ConfigBinding.FromJson("{\"tokenizer\": \"cl100k\"}", "x").Tokenizer);
        Assert.Equal(TokenizerKind.Gpt2, ConfigBinding.Apply(new TransformerConfig(), ["tokenizer=gpt2"]).Tokenizer);
        Assert.Throws<ArgumentException>(() => ConfigBinding.FromJson("{\"tokenizer\": \"gpt3\"}", "x"));
        Assert.Throws<ArgumentException>(() => ConfigBinding.Apply(new TransformerConfig(), ["tokenizer=gpt3"]));
        Assert.Equal(TokenizerKind.Gpt2, TextTokenizer.For(new TransformerConfig { Tokenizer = TokenizerKind.Gpt2 }).Kind);
    }
}

/// <summary>Training, evaluation and sampling with a BPE vocabulary: num_tokens from the tokenizer, bits per byte against
/// independent computations, the tokenizer recorded in the checkpoint and used by sample and eval.</summary>
public sealed class TokenizerTrainingTests : TrainedModelTestBase
{
    private static TextTokenizer Gpt2 => TextTokenizer.For(TokenizerKind.Gpt2);
    private static TransformerConfig Gpt2Micro => MicroConfig with { Tokenizer = TokenizerKind.Gpt2, NumTokens = 50257 };

    /// <summary>Bytes of ASCII tokens counted from the library's own decoded text, not from the tokenizer's byte table.</summary>
    private static long AsciiBytes(IEnumerable<int> ids) => ids.Sum(id => (long)Gpt2.LibraryDecode([id])!.Length);

    [Fact]
    public void Validation_bits_per_byte_equal_an_independent_computation()
    {
        TokenText train = Gpt2.Tokenize(TrainBytes), validation = Gpt2.Tokenize(ValBytes);
        Assert.True(Encoding.UTF8.GetString(ValBytes).All(char.IsAscii));
        var options = MicroOptions with { EvalBatches = 1, BatchSize = 2 };
        using var trainer = new Trainer(Gpt2Micro, options, train, validation);
        trainer.TrainStep();
        var result = trainer.ValidationLoss();

        // By hand: windows [0,16), [16,32) of the validation tokens; log-softmax in float64; bytes from decoded text.
        var ids = Enumerable.Range(0, (int)validation.Length).Select(i => validation[i]).ToArray();
        double nats = 0;
        var predicted = new List<int>();
        trainer.Model.eval();
        using (no_grad())
            for (int w = 0; w < 2; w++)
            {
                var window = ids[(w * 16)..(w * 16 + 16)];
                var logProbs = trainer.Model.forward(tensor(window.Select(i => (long)i).ToArray(), new long[] { 1, 16 }), null)
                    .Logits[0].to(ScalarType.Float64).log_softmax(-1);                           // (T, 50257)
                for (int t = 0; t + 1 < 16; t++) { nats -= logProbs[t, window[t + 1]].item<double>(); predicted.Add(window[t + 1]); }
            }
        long bytes = AsciiBytes(predicted);
        Assert.Equal(30, result.Tokens);
        Assert.Equal(bytes, result.Bytes);
        Assert.True(bytes > 60, $"{bytes} bytes for 30 tokens");                           // BPE tokens cover several bytes
        double expected = nats / bytes / Math.Log(2);
        Assert.True(Math.Abs(result.BitsPerByte - expected) <= 1e-5 * expected, $"bits per byte {result.BitsPerByte} vs by hand {expected}");
        Assert.True(Math.Abs(result.LossPerToken - nats / 30) <= 1e-5 * nats / 30, $"loss {result.LossPerToken} vs {nats / 30}");
        Assert.Equal(result.BitsPerByte, trainer.ValidationBitsPerCharacter());
    }

    /// <summary>A step's BytesPerToken (the training log's bpc = loss / ln 2 / BytesPerToken) counts the bytes of exactly
    /// the tokens the step predicted: the batches a twin trainer with the same seed draws, decoded by the library.</summary>
    [Fact]
    public void Step_bytes_per_token_are_those_of_the_predicted_tokens()
    {
        TokenText train = Gpt2.Tokenize(TrainBytes), validation = Gpt2.Tokenize(ValBytes);
        using var trainer = new Trainer(Gpt2Micro, MicroOptions, train, validation);
        using var twin = new Trainer(Gpt2Micro, MicroOptions, train, validation);
        var predicted = new List<int>();
        for (int micro = 0; micro < MicroOptions.Accumulation; micro++)
        {
            var batch = twin.NextBatch();                                                      // (B, T)
            predicted.AddRange(batch.narrow(1, 1, batch.shape[1] - 1).contiguous().data<long>().ToArray().Select(id => (int)id));
        }
        var step = trainer.TrainStep();
        Assert.Equal((double)AsciiBytes(predicted) / predicted.Count, step.BytesPerToken, 1e-12);
        Assert.True(step.BytesPerToken > 2, $"{step.BytesPerToken} bytes per GPT-2 token");
    }

    [Fact]
    public void For_bytes_bits_per_byte_is_the_bits_per_character_exactly()
    {
        using var trainer = new Trainer(MicroConfig, MicroOptions, TrainBytes, ValBytes);
        var step = trainer.TrainStep();
        Assert.Equal(1.0, step.BytesPerToken);
        var result = trainer.ValidationLoss();
        Assert.Equal(result.Tokens, result.Bytes);
        Assert.Equal(result.Nats / result.Tokens / Math.Log(2), result.BitsPerByte);       // the formula of earlier versions, bit for bit
        Assert.Equal(result.BitsPerByte, trainer.ValidationBitsPerCharacter());
    }

    [Fact]
    public void Trainer_needs_num_tokens_and_data_of_the_configured_tokenizer()
    {
        TokenText train = Gpt2.Tokenize(TrainBytes), validation = Gpt2.Tokenize(ValBytes);
        var e = Assert.Throws<ArgumentException>(() => new Trainer(Gpt2Micro with { NumTokens = 256 }, MicroOptions, train, validation));
        Assert.Equal("NumTokens", e.ParamName);
        Assert.Contains("tokenizer = gpt2 needs num_tokens = 50257", e.Message);
        var mixed = Assert.Throws<ArgumentException>(() => new Trainer(Gpt2Micro, MicroOptions, TrainBytes, ValBytes));
        Assert.Contains("tokenized with bytes / bytes, but the configuration says tokenizer = gpt2", mixed.Message);
        var cl100k = Assert.Throws<ArgumentException>(() => new Trainer(MicroConfig with { Tokenizer = TokenizerKind.Cl100k }, MicroOptions, TrainBytes, ValBytes));
        Assert.Contains("needs num_tokens = 100277", cl100k.Message);
    }

    private string TrainGpt2(params string[] extra)
    {
        string data = Path.Combine(Dir, "text.txt");
        File.WriteAllBytes(data, Text);
        var run = CliRunner.Run(["train", "--data", data, "--out", RunDir, "--preset", WriteMicroPreset(), "--tokenizer", "gpt2", "--max-steps", "3",
            "--batch-size", "2", "--eval-every", "3", "--eval-batches", "1", "--val-fraction", "0.2", "--warmup", "1", .. extra]);
        Assert.True(run.Code == 0, run.Err + run.Out);
        return data;
    }

    /// <summary>A tiny GPT-2 model trained through the CLI records its tokenizer; sample and eval pick it up from the checkpoint.</summary>
    [Fact]
    public void Cli_train_records_gpt2_and_sample_and_eval_use_it()
    {
        string data = TrainGpt2();
        string checkpoint = Checkpoint.List(RunDir)[^1].Path;
        var (config, _, step) = Checkpoint.ReadHeader(checkpoint);
        Assert.Equal(3, step);
        Assert.Equal(TokenizerKind.Gpt2, config.Tokenizer);
        Assert.Equal(50257, config.NumTokens);                                             // from the tokenizer, not the preset's 256
        Assert.Contains("\"tokenizer\": \"gpt2\"", File.ReadAllText(Path.Combine(RunDir, "config.json")));

        // The log's bits per byte is its per-token loss over the bytes of the validation windows' predicted tokens.
        var valBytes = Text[(Text.Length - (int)Math.Round(Text.Length * 0.2))..];
        var valIds = Gpt2.Encode(valBytes);
        int windows = Math.Min(1 * 2, (valIds.Length - 1) / 16);                           // eval_batches × batch_size, non-overlapping
        Assert.Equal(2, windows);
        long windowBytes = AsciiBytes(valIds[1..16]) + AsciiBytes(valIds[17..32]);         // the predicted tokens of both windows
        var last = File.ReadLines(Path.Combine(RunDir, "log.jsonl")).Select(l => JsonDocument.Parse(l).RootElement)
            .Last(e => e.GetProperty("val_bpc").ValueKind == JsonValueKind.Number);
        double valBpc = last.GetProperty("val_bpc").GetDouble(), valLoss = last.GetProperty("val_loss").GetDouble();
        Assert.Equal(valLoss * 15 * windows / windowBytes / Math.Log(2), valBpc, 1e-9);

        // sample: the prompt encoded with GPT-2, the output decoded from exactly the tokens Generate returns.
        const string prompt = "Fellow citizens";
        var (model, _, _) = Checkpoint.LoadModel(checkpoint);
        long[] generated;
        using (model)
        {
            var promptIds = Gpt2.Encode(prompt);
            model.eval();
            generated = Sampling.Generate(model, tensor(promptIds.Select(i => (long)i).ToArray(), new long[] { 1, promptIds.Length }), 6, 16,
                w => model.forward(w, null).Logits, 0.9, null, null, seed: 4).data<long>().ToArray();
        }
        string[] args = ["sample", "--checkpoint", RunDir, "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0.9", "--seed", "4"];
        var cached = CliRunner.Run(args);
        Assert.True(cached.Code == 0, cached.Err);
        Assert.Equal(prompt + Gpt2.Decode(generated.Select(i => (int)i)) + Environment.NewLine, cached.Out);
        Assert.Contains("sampled 6 gpt2 tokens", cached.Err);
        Assert.Equal(cached.Out, CliRunner.Run([.. args, "--no-cache"]).Out);               // the incremental decoding path agrees

        // eval: bits per byte over the predicted tokens' bytes, by hand (windows of 16 tokens overlapping by one).
        string evalText = "The quick brown fox jumps over the lazy dog. Fellow citizens of the Senate and House of Representatives! The end.";
        string evalPath = Path.Combine(Dir, "eval.txt");
        File.WriteAllText(evalPath, evalText);
        var json = CliRunner.Run("eval", "--checkpoint", RunDir, "--data", evalPath, "--json", "--batch-size", "2");
        Assert.True(json.Code == 0, json.Err);
        var root = JsonDocument.Parse(json.Out).RootElement;
        var ids = Gpt2.Encode(evalText);
        double nats = 0;
        var predicted = new List<int>();
        var (again, _, _) = Checkpoint.LoadModel(checkpoint);
        using (again)
        using (no_grad())
        {
            again.eval();
            for (int start = 0; start + 1 < ids.Length; start += 15)
            {
                var window = ids[start..Math.Min(start + 16, ids.Length)];
                var logProbs = again.forward(tensor(window.Select(i => (long)i).ToArray(), new long[] { 1, window.Length }), null)
                    .Logits[0].to(ScalarType.Float64).log_softmax(-1);                       // (T, 50257)
                for (int t = 0; t + 1 < window.Length; t++) { nats -= logProbs[t, window[t + 1]].item<double>(); predicted.Add(window[t + 1]); }
            }
        }
        long bytes = AsciiBytes(predicted);
        Assert.Equal(Encoding.UTF8.GetByteCount(evalText) - AsciiBytes(ids[..1]), bytes);  // every byte but the first token's
        Assert.Equal("gpt2", root.GetProperty("tokenizer").GetString());
        Assert.Equal(ids.Length - 1, root.GetProperty("tokens").GetInt64());
        Assert.Equal(bytes, root.GetProperty("bytes").GetInt64());
        double expected = nats / bytes / Math.Log(2);
        Assert.Equal(expected, root.GetProperty("bpc").GetDouble(), 1e-9 * expected);
        Assert.Equal(nats / predicted.Count, root.GetProperty("loss").GetDouble(), 1e-9 * nats);
        var plain = CliRunner.Run("eval", "--checkpoint", RunDir, "--data", evalPath);
        Assert.Contains($"predicted gpt2 tokens", plain.Out);
        Assert.Contains($"covering {bytes:N0} bytes", plain.Out);

        // plot attention runs the model on the GPT-2 tokens of its text.
        var plot = CliRunner.Run("plot", "attention", "--checkpoint", RunDir, "--text", prompt, "--out", Path.Combine(Dir, "attention.png"));
        Assert.True(plot.Code == 0, plot.Err);
        Assert.Contains($"on {Gpt2.Encode(prompt).Length} gpt2 tokens", plot.Out);
    }

    [Fact]
    public void Resume_keeps_the_tokenizer_and_refuses_another()
    {
        string data = TrainGpt2();
        var other = CliRunner.Run("train", "--data", data, "--out", RunDir, "--resume", "--max-steps", "4", "--tokenizer", "bytes");
        AssertUsageError(other, "was trained with tokenizer gpt2; drop --tokenizer");
        var resumed = CliRunner.Run("train", "--data", data, "--out", RunDir, "--resume", "--max-steps", "4", "--eval-every", "4", "--eval-batches", "1", "--val-fraction", "0.2");
        Assert.True(resumed.Code == 0, resumed.Err + resumed.Out);
        Assert.Equal(TokenizerKind.Gpt2, Checkpoint.ReadHeader(Checkpoint.List(RunDir)[^1].Path).Config.Tokenizer);
    }

    [Theory]
    [InlineData(new[] { "--tokenizer", "gpt3" }, "--tokenizer: unknown tokenizer 'gpt3'; expected one of bytes, gpt2, cl100k.")]
    [InlineData(new[] { "--tokenizer", "gpt2", "--set", "num_tokens=256" }, "--set num_tokens=256 disagrees with the tokenizer gpt2, whose vocabulary has 50257 tokens")]
    [InlineData(new[] { "--tokenizer", "gpt2", "--set", "tokenizer=cl100k" }, "--tokenizer gpt2 disagrees with --set tokenizer=cl100k")]
    [InlineData(new[] { "--set", "tokenizer=gpt3" }, "--set: tokenizer expects one of")]
    public void Bad_tokenizer_input_is_one_line_naming_the_option_and_leaves_nothing(string[] extra, string expected)
    {
        string data = Path.Combine(Dir, "text.txt");
        File.WriteAllBytes(data, Text);
        var result = CliRunner.Run(["train", "--data", data, "--out", RunDir, "--preset", "tiny", "--max-steps", "1", .. extra]);
        AssertUsageError(result, expected);
        Assert.False(Directory.Exists(RunDir));
    }

    [Fact]
    public void Config_show_prints_the_tokenizer()
    {
        var shown = CliRunner.Run("config", "show", "--preset", "tiny");
        Assert.Contains("\"tokenizer\": \"bytes\"", shown.Out);
        Assert.Contains("\"tokenizer\": \"cl100k\"", CliRunner.Run("config", "show", "--preset", "tiny", "--set", "tokenizer=cl100k").Out);
    }
}
