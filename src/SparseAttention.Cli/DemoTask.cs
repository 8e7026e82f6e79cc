using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>
/// The demo's synthetic associative-recall task. A sequence of <see cref="SeqLen"/> tokens holds
/// <see cref="Pairs"/> records "V K" (a value token, then its key token) scattered among filler tokens; it ends
/// with <see cref="Queries"/> questions "? K V" about keys stored earlier. The model is scored only where it must
/// produce an answer: at each question's K it predicts the next token, the value stored with that key.
/// Every stored key lies at least <see cref="MinDistance"/> tokens before any question's key (the caller sets it
/// beyond the local model's receptive field), so nothing but a content-based lookup finds the record.
/// Keys in one sequence are distinct; values are drawn independently and uniformly, so without the lookup the
/// best guess is right with probability <see cref="Chance"/>.
/// </summary>
/// <remarks>Why the value comes first: with token shift (the second half of each token's features comes from the
/// previous token) the stored key's position also carries its value. The question's key is the same token as the
/// stored key, and identical tokens have identical embeddings, so cosine k-means tends to put the two in one
/// cluster; attending there reads the value.</remarks>
public sealed record RecallTask(int SeqLen, int NumKeys, int NumValues, int Pairs, int Queries, int MinDistance)
{
    /// <summary>Filler token id.</summary>
    public const int Filler = 0;
    /// <summary>The '?' token id that opens a question.</summary>
    public const int Marker = 1;
    /// <summary>Id of the first key token; keys are FirstKey … FirstKey + NumKeys − 1.</summary>
    public const int FirstKey = 2;

    /// <summary>Id of the first value token; values follow the keys.</summary>
    public int FirstValue => FirstKey + NumKeys;
    /// <summary>Vocabulary size: filler, '?', keys, values.</summary>
    public int Vocab => FirstValue + NumValues;
    /// <summary>Accuracy of guessing: values are uniform and independent.</summary>
    public double Chance => 1.0 / NumValues;
    /// <summary>First position of the question block at the end (each question takes 3 tokens).</summary>
    public int QueryStart => SeqLen - 3 * Queries;
    /// <summary>Records lie in [0, MemoryEnd): the last stored key possible is MinDistance tokens before the first
    /// question's key (at QueryStart + 1).</summary>
    public int MemoryEnd => QueryStart + 2 - MinDistance;

    /// <summary>Throws <see cref="ArgumentException"/> naming the field when the sizes do not fit together.</summary>
    public RecallTask Validate()
    {
        Check.Positive(NumKeys, nameof(NumKeys));
        Check.That(NumValues >= 2, nameof(NumValues), $"must be >= 2, got {NumValues}.");
        Check.Positive(Pairs, nameof(Pairs));
        Check.Positive(Queries, nameof(Queries));
        Check.Positive(MinDistance, nameof(MinDistance));
        Check.That(Pairs <= NumKeys, nameof(Pairs), $"keys in a sequence are distinct, so at most NumKeys = {NumKeys}, got {Pairs}.");
        Check.That(Queries <= Pairs, nameof(Queries), $"each question asks a different stored key, so at most Pairs = {Pairs}, got {Queries}.");
        // Records need 2·Pairs free slots among the MemoryEnd positions (with room to scatter).
        Check.That(MemoryEnd >= 4 * Pairs, nameof(SeqLen),
            $"seq_len {SeqLen} is too short for {Pairs} records placed at least {MinDistance} tokens before {Queries} questions " +
            $"(needs at least {4 * Pairs + MinDistance - 2 + 3 * Queries}).");
        return this;
    }

    /// <summary>A token's readable name: "k07", "v03", "?", "·".</summary>
    public string Name(long token) =>
        token == Filler ? "·" : token == Marker ? "?" : token < FirstValue ? $"k{token - FirstKey:D2}" : $"v{token - FirstValue:D2}";

    /// <summary>Draws one sequence.</summary>
    public RecallExample Sample(Random rng)
    {
        ArgumentNullException.ThrowIfNull(rng);
        var tokens = new long[SeqLen];
        // Keys: a random subset, in random order (partial Fisher-Yates).
        var keys = Enumerable.Range(0, NumKeys).ToArray();
        for (int i = 0; i < Pairs; i++) { int j = rng.Next(i, NumKeys); (keys[i], keys[j]) = (keys[j], keys[i]); }
        var values = new int[Pairs];
        for (int i = 0; i < Pairs; i++) values[i] = rng.Next(NumValues);

        // Record starts in [0, MemoryEnd − 1) without overlaps: sorted offsets into the free positions, each record
        // then pushed right by the records before it (start[i+1] − start[i] ≥ 2).
        int free = MemoryEnd - 2 * Pairs;
        var recordStart = new int[Pairs];
        for (int i = 0; i < Pairs; i++) recordStart[i] = rng.Next(free + 1);
        Array.Sort(recordStart);
        for (int i = 0; i < Pairs; i++) recordStart[i] += 2 * i;
        // Shuffle which key goes to which slot so the question order says nothing about positions.
        for (int i = Pairs - 1; i > 0; i--) { int j = rng.Next(i + 1); (recordStart[i], recordStart[j]) = (recordStart[j], recordStart[i]); }
        for (int i = 0; i < Pairs; i++)
        {
            tokens[recordStart[i]] = FirstValue + values[i];
            tokens[recordStart[i] + 1] = FirstKey + keys[i];
        }

        // Questions: Queries different records, in random order.
        var asked = Enumerable.Range(0, Pairs).ToArray();
        for (int i = 0; i < Queries; i++) { int j = rng.Next(i, Pairs); (asked[i], asked[j]) = (asked[j], asked[i]); }
        var answerPositions = new int[Queries];
        var recordPositions = new int[Queries];
        for (int i = 0; i < Queries; i++)
        {
            int at = QueryStart + 3 * i, r = asked[i];
            tokens[at] = Marker;
            tokens[at + 1] = FirstKey + keys[r];
            tokens[at + 2] = FirstValue + values[r];
            answerPositions[i] = at + 1;
            recordPositions[i] = recordStart[r] + 1;
        }
        return new RecallExample(tokens, answerPositions, recordPositions);
    }

    /// <summary>A batch of <paramref name="count"/> sequences: tokens (B, T) and targets (B, T) for
    /// <see cref="Model.LanguageModelLoss.NextToken(Tensor, Tensor, long)"/> — the value token after each question's key,
    /// −100 (ignored) everywhere else — so only answers are scored.</summary>
    public (Tensor Tokens, Tensor Targets, RecallExample[] Examples) Batch(int count, Random rng)
    {
        var examples = new RecallExample[count];
        var tokens = new long[count * SeqLen];
        var targets = new long[count * SeqLen];
        Array.Fill(targets, -100L);
        for (int b = 0; b < count; b++)
        {
            var e = examples[b] = Sample(rng);
            Array.Copy(e.Tokens, 0, tokens, b * SeqLen, SeqLen);
            foreach (int a in e.AnswerPositions) targets[b * SeqLen + a + 1] = e.Tokens[a + 1];
        }
        return (tensor(tokens, new long[] { count, SeqLen }), tensor(targets, new long[] { count, SeqLen }), examples);
    }
}
