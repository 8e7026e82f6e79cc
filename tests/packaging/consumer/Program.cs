// Smoke test of the SparseAttention package from a plain console app: a block-sparse kernel against a dense
// computation written here from index arithmetic, and a forward pass of a small routing language model.
using SparseAttention.Kernels;
using SparseAttention.Model;
using SparseAttention.Patterns;
using TorchSharp;
using static TorchSharp.torch;

torch.manual_seed(7);
const int B = 2, H = 3, T = 100, D = 16, W = 32;                      // T not a multiple of the block on purpose
var q = randn(B, H, T, D); var k = randn(B, H, T, D); var v = randn(B, H, T, D);
var mask = new WindowPattern(windowSize: W, lookBackward: 1, lookForward: 0, exactWindowSize: false, causal: true)
    .Compile(seqLen: T, blockSize: 16, heads: H);
var output = BlockSparseAttention.Attention(q, k, v, mask);           // (B, H, T, D)

// Dense check: query i sees key j iff j <= i and j's window is i's window or the one before.
var i = arange(T).unsqueeze(1); var j = arange(T).unsqueeze(0);        // (T, 1), (1, T)
var allowed = (j <= i).logical_and(j.div(W, rounding_mode: RoundingMode.floor) >= i.div(W, rounding_mode: RoundingMode.floor) - 1);
var scores = matmul(q, k.transpose(-2, -1)) / Math.Sqrt(D);           // (B, H, T, T)
var expected = matmul(softmax(scores.masked_fill(allowed.logical_not(), double.NegativeInfinity), -1), v);
double diff = (output - expected).abs().max().item<float>();
Console.WriteLine($"kernel shape {string.Join("x", output.shape)} max_abs_diff {diff:E2}");

var config = new TransformerConfig
{
    NumTokens = 256, Dim = 32, Depth = 2, Heads = 4, MaxSeqLen = 64, Causal = true,
    WindowSize = 16, NLocalAttnHeads = [2], BlockSize = 16,
};
var model = new RoutingTransformerLM(config);
var tokens = randint(0, 256, new long[] { 2, 64 });
var (logits, aux) = model.forward(tokens);                            // (2, 64, 256)
double loss = LanguageModelLoss.NextToken(logits, tokens).item<float>();
Console.WriteLine($"model logits {string.Join("x", logits.shape)} loss {loss:F3}");

bool ok = diff < 1e-4 && string.Join("x", logits.shape) == "2x64x256" && double.IsFinite(loss) && loss > 0;
Console.WriteLine(ok ? "PACKAGE-SMOKE-OK" : "PACKAGE-SMOKE-FAILED");
return ok ? 0 : 1;
