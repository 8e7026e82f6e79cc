namespace SparseAttention.Cli;

/// <summary>Writes files so a reader never sees a half-written one: write <c>FILE.tmp</c>, then move it
/// over <c>FILE</c>.</summary>
internal static class AtomicFile
{
    public static void WriteAllText(string path, string text) => Write(path, tmp => File.WriteAllText(tmp, text));

    public static void WriteAllBytes(string path, byte[] bytes) => Write(path, tmp => File.WriteAllBytes(tmp, bytes));

    /// <summary>Calls <paramref name="writeTemp"/> with the temporary path, then moves it into place;
    /// the temporary file is removed if anything fails.</summary>
    public static void Write(string path, Action<string> writeTemp)
    {
        string full = Path.GetFullPath(path);
        string tmp = full + ".tmp";
        try
        {
            string? dir = Path.GetDirectoryName(full);
            if (!string.IsNullOrEmpty(dir)) Directory.CreateDirectory(dir);
            writeTemp(tmp);
            File.Move(tmp, full, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            try { File.Delete(tmp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            throw new IOException($"cannot write {path}: {e.Message}", e);
        }
    }
}
