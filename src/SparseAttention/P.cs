namespace SparseAttention; public static class Placeholder {}
