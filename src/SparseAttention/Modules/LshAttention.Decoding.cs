using SparseAttention.Hashing;
using SparseAttention.Kernels;
using SparseAttention.Model;
using static TorchSharp.torch;

namespace SparseAttention.Modules;

public sealed partial class LshAttention
{
    /// <summary>Shared-QK keys: the queries normalised, k̂ = q/‖q‖ (B, H, T, D); the forward and the decoder use this one definition.</summary>
    private static Tensor SharedKeys(Tensor q) => q / q.norm(-1, keepdim: true).clamp_min(1e-6);

    /// <summary>A decoder for causal LSH / ALSH heads (null when not causal: bidirectional chunks depend on the future).</summary>
    public HeadGroupDecoder? CreateDecoder(long batch, ScalarType dtype, Device device) => CreateDecoder(batch, dtype, device, null);

    /// <summary><see cref="CreateDecoder(long, ScalarType, Device)"/> for heads attending with relative-position terms:
    /// <paramref name="relative"/> gives them as they are at each call (null = none).</summary>
    internal HeadGroupDecoder? CreateDecoder(long batch, ScalarType dtype, Device device, Func<RelativePositionTerms?>? relative) =>
        causal ? new Decoder(this, batch, dtype, device, relative) : null;

    /// <summary>
    /// Decoding state of causal LSH heads. Per (row, head, round) and bucket: the keys it has had, its open chunk and
    /// the chunk before it (causal chunks are cut per bucket, <see cref="LshGrouping"/>). A new token's key joins its
    /// bucket (a new chunk every W keys); its query, in each round, attends the open chunk of its own bucket and the
    /// chunk before — the chunk holding the latest key ≤ it, as in the full forward — and the rounds merge into one
    /// softmax with a key counted once per round it was seen (once with dedup); with shared QK a token sees itself
    /// only when nothing else is allowed. ALSH keeps each row's largest-norm key so far: the causal transforms
    /// normalise by that running maximum.
    /// </summary>
    private sealed class Decoder : HeadGroupDecoder
    {
        private readonly LshAttention lsh;
        private readonly KeyValueCache cache;
        private readonly long batch;
        private readonly Dictionary<long, (int Count, List<int> Open, List<int> Previous)>[] buckets;   // per (b, h, round)
        private Tensor? largestKey;                                                                  // (B, H, 1, D), ALSH only
        private readonly Func<RelativePositionTerms?>? relative;

        public Decoder(LshAttention lsh, long batch, ScalarType dtype, Device device, Func<RelativePositionTerms?>? relative)
        {
            this.lsh = lsh;
            this.relative = relative;
            this.batch = batch;
            cache = new KeyValueCache(batch, lsh.heads, lsh.maxSeqLen, lsh.dimHead, lsh.dimHead, dtype, device);
            buckets = Enumerable.Range(0, (int)(batch * lsh.heads * lsh.nHashes))
                                .Select(_ => new Dictionary<long, (int, List<int>, List<int>)>()).ToArray();
        }

        public override Tensor Prefill(Tensor q, Tensor k, Tensor v, Tensor? keyMask, int[] lengths)
        {
            using var scope = NewDisposeScope();
            var result = lsh.forward(q, lsh.SharedQk ? null : k, v, keyMask, relative?.Invoke());
            cache.WritePrompt(lsh.SharedQk ? SharedKeys(q) : k, v, lengths);
            long seqLen = q.shape[2];
            var keyBuckets = result.KeyBuckets.cpu().contiguous().data<long>().ToArray();   // (B, H, R, T)
            for (int u = 0; u < buckets.Length; u++)
                for (int t = 0; t < lengths[u / (lsh.heads * lsh.nHashes)]; t++)
                    AddKey(u, keyBuckets[u * seqLen + t], t);
            if (!lsh.SharedQk)
            {
                // The largest real key of each row: what the causal ALSH transforms divide by from here on.
                var norms = k.detach().norm(-1);                                              // (B, H, T)
                var real = arange(seqLen, device: k.device).view(1, seqLen)
                           .lt(tensor(lengths.Select(n => (long)n).ToArray(), device: k.device).view(batch, 1));   // (B, T)
                var best = norms.masked_fill(real.logical_not().unsqueeze(1), -1).argmax(-1, keepdim: true);       // (B, H, 1)
                largestKey?.Dispose();
                largestKey = k.detach().gather(2, best.unsqueeze(-1).expand(-1, -1, 1, k.shape[3])).contiguous()
                              .MoveToOuterDisposeScope().DetachFromDisposeScope();          // (B, H, 1, D)
            }
            return result.Output.MoveToOuterDisposeScope();
        }

        private void AddKey(int unit, long bucket, int position)
        {
            var map = buckets[unit];
            if (!map.TryGetValue(bucket, out var chunk)) chunk = (0, new List<int>(), new List<int>());
            if (chunk.Count > 0 && chunk.Count % lsh.bucketSize == 0)                      // the open chunk is full
            {
                (chunk.Previous, chunk.Open) = (chunk.Open, chunk.Previous);
                chunk.Open.Clear();
            }
            chunk.Open.Add(position);
            map[bucket] = (chunk.Count + 1, chunk.Open, chunk.Previous);
        }

        public override Tensor Step(Tensor q, Tensor k, Tensor v, int[] positions)
        {
            using var scope = NewDisposeScope();
            var hash = lsh.rotations;
            Tensor keys, queryBuckets, keyBuckets;
            if (lsh.alsh is AlshTransform transform)
            {
                keys = k;
                // The running maximum as the causal transform sees it: the largest key so far placed before this one.
                var (pk, qq) = MipsTransforms.Apply(cat([largestKey!, k], 2), cat([q, q], 2), transform, lsh.queryNormalizedFirst, null, causal: true);
                keyBuckets = SignRandomProjection.Buckets(pk.narrow(2, 1, 1), hash);          // (B, H, R, 1)
                queryBuckets = SignRandomProjection.Buckets(qq.narrow(2, 1, 1), hash);
                var larger = k.norm(-1, keepdim: true).gt(largestKey!.norm(-1, keepdim: true));  // (B, H, 1, 1)
                largestKey.copy_(where(larger, k, largestKey));
            }
            else
            {
                keys = SharedKeys(q);                                                         // (B, H, 1, D)
                keyBuckets = queryBuckets = AngularLsh.Buckets(keys, hash);                   // (B, H, R, 1)
            }
            cache.Write(keys, v, positions);
            var kb = keyBuckets.cpu().contiguous().data<long>().ToArray();                   // (B, H, R)
            var qb = ReferenceEquals(keyBuckets, queryBuckets) ? kb : queryBuckets.cpu().contiguous().data<long>().ToArray();
            int heads = lsh.heads, rounds = lsh.nHashes;
            var lists = new List<int>[batch * heads];
            for (int bh = 0; bh < batch * heads; bh++)
            {
                int t = positions[bh / heads];
                var list = new List<int>();
                var seen = lsh.dedup ? new HashSet<int>() : null;
                bool self = false;
                for (int r = 0; r < rounds; r++)
                {
                    int unit = bh * rounds + r;
                    AddKey(unit, kb[unit], t);
                    if (!buckets[unit].TryGetValue(qb[unit], out var chunk)) continue;        // no key of its bucket yet
                    foreach (int j in chunk.Previous.Concat(chunk.Open))
                    {
                        if (lsh.SharedQk && j == t) { self = true; continue; }
                        if (seen is null || seen.Add(j)) list.Add(j);
                    }
                }
                if (list.Count == 0 && self) list.Add(t);                                     // itself only when nothing else
                lists[bh] = list;
            }
            var (slots, width) = Flatten(lists, cache.Slot);
            var terms = relative?.Invoke();
            var distances = terms is null ? null : new DecodeAttention.Relative(Distances(lists, width, i => positions[i / heads]), terms);
            var output = DecodeAttention.Attend(q.squeeze(2), cache.Keys, cache.Values, slots, width, relative: distances);   // (B, H, D)
            return output.unsqueeze(2).MoveToOuterDisposeScope();
        }

        public override void Dispose()
        {
            cache.Dispose();
            largestKey?.Dispose();
        }
    }
}
