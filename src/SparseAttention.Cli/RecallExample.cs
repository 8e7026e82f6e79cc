namespace SparseAttention.Cli;

/// <summary>One sequence of the <see cref="RecallTask"/>.</summary>
/// <param name="Tokens">The T token ids.</param>
/// <param name="AnswerPositions">Position of each question's key; the answer is the token after it.</param>
/// <param name="RecordPositions">For each question, the position of the stored key (its value is the token before it).</param>
public sealed record RecallExample(long[] Tokens, int[] AnswerPositions, int[] RecordPositions)
{
    /// <summary>The value token question <paramref name="i"/> expects.</summary>
    public long Answer(int i) => Tokens[AnswerPositions[i] + 1];
}
