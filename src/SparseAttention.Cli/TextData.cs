using SparseAttention.Training;

namespace SparseAttention.Cli;

/// <summary>Reads text data for <c>eval</c> and <c>plot</c> as <c>train</c> does (<see cref="ByteCorpus.ReadText"/>),
/// turning its errors into usage errors that name the option.</summary>
internal static class TextData
{
    public static byte[] Read(string path, string option, int minBytes)
    {
        byte[] bytes;
        try { bytes = ByteCorpus.ReadText(path).Bytes; }
        catch (ArgumentException e) { throw new CliUsageException(option + e.Message.Replace(" (Parameter 'data')", "")["data".Length..]); }
        if (bytes.Length < minBytes)
            throw new CliUsageException($"{option}: {path} has {bytes.Length} byte(s); at least {minBytes} are needed.");
        return bytes;
    }
}
