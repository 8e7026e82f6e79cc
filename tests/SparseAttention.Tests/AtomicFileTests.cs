using SparseAttention.Training;
using Xunit;

namespace SparseAttention.Tests;

public sealed class AtomicFileTests : IDisposable
{
    private readonly string dir = Path.Combine(Path.GetTempPath(), "sa-atomic-" + Guid.NewGuid().ToString("N"));

    public AtomicFileTests() => Directory.CreateDirectory(dir);

    public void Dispose()
    {
        try { Directory.Delete(dir, recursive: true); } catch (IOException) { }
    }

    private string[] Files() => Directory.GetFiles(dir).Select(Path.GetFileName).Order(StringComparer.Ordinal).ToArray()!;

    [Fact]
    public void Writes_replace_the_file_and_leave_nothing_else()
    {
        string path = Path.Combine(dir, "out.json");
        AtomicFile.WriteAllText(path, "first ü");
        Assert.Equal("first ü", File.ReadAllText(path));
        Assert.Equal(new byte[] { 0x66 }, File.ReadAllBytes(path)[..1]);                  // no byte-order mark
        AtomicFile.WriteAllBytes(path, [1, 2, 3]);
        Assert.Equal(new byte[] { 1, 2, 3 }, File.ReadAllBytes(path));
        Assert.Equal(["out.json"], Files());
    }

    [Fact]
    public void Creates_missing_folders()
    {
        string path = Path.Combine(dir, "a", "b", "c.txt");
        AtomicFile.WriteAllText(path, "x");
        Assert.Equal("x", File.ReadAllText(path));
    }

    [Fact]
    public void A_failure_mid_write_keeps_the_previous_file_and_removes_the_temporary_one()
    {
        string path = Path.Combine(dir, "ckpt.bin");
        AtomicFile.WriteAllBytes(path, [9, 8, 7, 6]);
        var io = Assert.Throws<IOException>(() => AtomicFile.Write(path, stream =>
        {
            stream.Write([1, 1, 1, 1, 1, 1, 1, 1]);
            stream.Flush();
            Assert.True(File.Exists(path + ".tmp"));                                       // the new content goes elsewhere ...
            throw new IOException("disk full (simulated)");                               // ... and the writer dies
        }));
        Assert.Contains("disk full (simulated)", io.Message);
        Assert.Contains(path, io.Message);
        Assert.Equal(new byte[] { 9, 8, 7, 6 }, File.ReadAllBytes(path));
        Assert.Equal(["ckpt.bin"], Files());

        // Other exceptions propagate unchanged, with the same clean-up.
        Assert.Throws<InvalidOperationException>(() => AtomicFile.Write(path, stream =>
        {
            stream.Write([5, 5]);
            throw new InvalidOperationException("bad state");
        }));
        Assert.Equal(new byte[] { 9, 8, 7, 6 }, File.ReadAllBytes(path));
        Assert.Equal(["ckpt.bin"], Files());
    }

    [Fact]
    public void A_failed_first_write_creates_no_file()
    {
        string path = Path.Combine(dir, "new.png");
        Assert.Throws<IOException>(() => AtomicFile.Write(path, _ => throw new IOException("no")));
        Assert.Empty(Files());
    }

    [Fact]
    public void Bad_arguments_are_named()
    {
        Assert.Equal("path", Assert.Throws<ArgumentException>(() => AtomicFile.WriteAllText("", "x")).ParamName);
        Assert.Equal("write", Assert.Throws<ArgumentNullException>(() => AtomicFile.Write(Path.Combine(dir, "x"), null!)).ParamName);
    }
}
