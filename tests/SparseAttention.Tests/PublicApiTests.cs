using System.Reflection;
using Xunit;

namespace SparseAttention.Tests;

/// <summary>
/// The library's public API against the baseline checked into the repository (tests/SparseAttention.Tests/PublicApi.txt),
/// so that every change to it is deliberate: a type or member added, removed or changed fails this test until the
/// baseline is rewritten (run the test with <c>SPARSE_ATTN_UPDATE_PUBLIC_API=1</c>, then review the diff).
/// </summary>
public sealed class PublicApiTests
{
    private static string BaselinePath => Path.Combine(ModelTests.RepositoryRoot(), "tests", "SparseAttention.Tests", "PublicApi.txt");

    [Fact]
    public void ThePublicApiEqualsTheCheckedInBaseline()
    {
        var actual = Describe(typeof(TorchAllocator).Assembly);
        if (Environment.GetEnvironmentVariable("SPARSE_ATTN_UPDATE_PUBLIC_API") == "1")
            File.WriteAllLines(BaselinePath, actual);
        var expected = File.ReadAllLines(BaselinePath);
        var added = actual.Except(expected).ToArray();
        var removed = expected.Except(actual).ToArray();
        Assert.True(added.Length == 0 && removed.Length == 0,
            $"public API differs from {BaselinePath} (rewrite it with SPARSE_ATTN_UPDATE_PUBLIC_API=1 if the change is deliberate):\n"
            + string.Join("\n", added.Select(l => "+ " + l).Concat(removed.Select(l => "- " + l))));
    }

    [Fact]
    public void InternalHelpersAreNotPublic()
    {
        var api = Describe(typeof(TorchAllocator).Assembly);
        Assert.DoesNotContain(api, l => l.StartsWith("T:SparseAttention.Check", StringComparison.Ordinal));
        Assert.DoesNotContain(api, l => l.Contains(".GatherRows(", StringComparison.Ordinal) || l.Contains(".ScatterMeanRows(", StringComparison.Ordinal));
        // One forward per module: no Forward beside forward.
        foreach (var type in typeof(TorchAllocator).Assembly.GetExportedTypes())
        {
            var names = type.GetMethods(BindingFlags.Public | BindingFlags.Instance).Select(m => m.Name).ToHashSet();
            Assert.False(names.Contains("forward") && names.Contains("Forward"), $"{type.FullName} has both forward and Forward");
        }
    }

    /// <summary>One sorted line per public type and per public or protected member declared on it.</summary>
    internal static string[] Describe(Assembly assembly)
    {
        const BindingFlags declared = BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance | BindingFlags.Static | BindingFlags.DeclaredOnly;
        var lines = new List<string>();
        foreach (var type in assembly.GetExportedTypes())
        {
            string kind = type.IsEnum ? "enum" : type.IsInterface ? "interface" : type.IsValueType ? "struct" : type.IsAbstract && type.IsSealed ? "static class" : "class";
            string baseType = type.BaseType is { } b && b != typeof(object) && b != typeof(ValueType) && b != typeof(Enum) ? " : " + Name(b) : "";
            lines.Add($"T:{Name(type)} {kind}{baseType}");
            foreach (var member in type.GetMembers(declared))
            {
                string? line = member switch
                {
                    ConstructorInfo c when Visible(c) => $"C:{Name(type)}({Parameters(c)})",
                    MethodInfo m when Visible(m) && !m.IsSpecialName => $"M:{Name(type)}.{m.Name}{Generic(m)}({Parameters(m)}) : {Name(m.ReturnType)}",
                    PropertyInfo p when p.GetMethod is { } g && Visible(g) || p.SetMethod is { } s && Visible(s) =>
                        $"P:{Name(type)}.{member.Name} : {Name(((PropertyInfo)member).PropertyType)} {{{Accessors((PropertyInfo)member)}}}",
                    FieldInfo f when (f.IsPublic || f.IsFamily || f.IsFamilyOrAssembly) && !f.IsSpecialName => $"F:{Name(type)}.{f.Name} : {Name(f.FieldType)}{(f.IsLiteral ? " const" : f.IsInitOnly ? " readonly" : "")}",
                    EventInfo e when e.AddMethod is { } a && Visible(a) => $"E:{Name(type)}.{e.Name} : {Name(e.EventHandlerType!)}",
                    _ => null,
                };
                if (line is not null && !member.Name.Contains('<')) lines.Add(line);   // not compiler-generated (<Clone>$, ...)
            }
        }
        return [.. lines.Distinct().OrderBy(l => l, StringComparer.Ordinal)];
    }

    private static bool Visible(MethodBase m) => m.IsPublic || m.IsFamily || m.IsFamilyOrAssembly;

    private static string Accessors(PropertyInfo p) =>
        string.Join(" ", new[] { p.GetMethod is { } g && Visible(g) ? "get;" : null, p.SetMethod is { } s && Visible(s) ? (IsInit(s) ? "init;" : "set;") : null }.OfType<string>());

    private static bool IsInit(MethodInfo setter) =>
        setter.ReturnParameter.GetRequiredCustomModifiers().Any(t => t.FullName == "System.Runtime.CompilerServices.IsExternalInit");

    private static string Generic(MethodInfo m) => m.IsGenericMethodDefinition ? "<" + string.Join(", ", m.GetGenericArguments().Select(a => a.Name)) + ">" : "";

    private static string Parameters(MethodBase m) =>
        string.Join(", ", m.GetParameters().Select(p => (p.ParameterType.IsByRef ? (p.IsOut ? "out " : "ref ") : "") + Name(p.ParameterType) + " " + p.Name
                                                          + (p.HasDefaultValue ? " = " + (p.DefaultValue?.ToString() ?? "null") : "")));

    private static string Name(Type t)
    {
        if (t.IsByRef) return Name(t.GetElementType()!);
        if (t.IsArray) return Name(t.GetElementType()!) + "[" + new string(',', t.GetArrayRank() - 1) + "]";
        if (t.IsGenericParameter) return t.Name;
        string name = t.IsNested ? Name(t.DeclaringType!) + "." + t.Name : (t.Namespace is null ? "" : t.Namespace + ".") + t.Name;
        if (!t.IsGenericType) return name;
        int tick = name.LastIndexOf('`');
        return (tick >= 0 ? name[..tick] : name) + "<" + string.Join(", ", t.GetGenericArguments().Select(Name)) + ">";
    }
}
