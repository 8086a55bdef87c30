/* The MPI test program built into the test images: a ring, an 8 MiB MPI_Allreduce and a
 * 1 MiB MPI_Sendrecv with each neighbour, every result checked on every rank.
 *
 * Each rank prints one line, "rank R of N: ring ok, allreduce ok, sendrecv ok", or says
 * what was wrong and exits 1 (MPI_Abort). Rank 0 first prints the MPI library's version
 * (MPI_Get_library_version, first line) so that a test can tell which MPI ran. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ALLREDUCE_INTS (8 * 1024 * 1024 / (int)sizeof(int)) /* 8 MiB */
#define SENDRECV_INTS (1024 * 1024 / (int)sizeof(int))      /* 1 MiB */

static void fail(int rank, const char *what, long long index, long long got, long long want)
{
    printf("rank %d: %s wrong at %lld: got %lld, want %lld\n", rank, what, index, got, want);
    fflush(stdout);
    MPI_Abort(MPI_COMM_WORLD, 1);
}

int main(int argc, char **argv)
{
    int rank, size;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (rank == 0) {
        char version[MPI_MAX_LIBRARY_VERSION_STRING];
        int len;
        MPI_Get_library_version(version, &len);
        version[strcspn(version, "\n")] = '\0';
        printf("library: %s\n", version);
        fflush(stdout);
    }
    int right = (rank + 1) % size, left = (rank + size - 1) % size;

    /* Ring: rank 0 starts a token at 0; each rank adds its rank and passes it on. */
    long long token = 0;
    if (rank != 0)
        MPI_Recv(&token, 1, MPI_LONG_LONG, left, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    token += rank;
    MPI_Send(&token, 1, MPI_LONG_LONG, right, 1, MPI_COMM_WORLD);
    if (rank == 0) {
        MPI_Recv(&token, 1, MPI_LONG_LONG, left, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        if (token != (long long)size * (size - 1) / 2)
            fail(rank, "ring token", 0, token, (long long)size * (size - 1) / 2);
    }

    /* Allreduce: element i of rank r is r + i; the sum is size * i + size * (size - 1) / 2. */
    int *in = malloc(ALLREDUCE_INTS * sizeof *in), *out = malloc(ALLREDUCE_INTS * sizeof *out);
    if (in == NULL || out == NULL)
        fail(rank, "malloc", 0, 0, 0);
    for (int i = 0; i < ALLREDUCE_INTS; i++)
        in[i] = rank + i % 1000;
    MPI_Allreduce(in, out, ALLREDUCE_INTS, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    for (int i = 0; i < ALLREDUCE_INTS; i++) {
        long long want = (long long)size * (i % 1000) + (long long)size * (size - 1) / 2;
        if (out[i] != want)
            fail(rank, "allreduce", i, out[i], want);
    }

    /* Sendrecv: send rank * N + i to the right, receive the left neighbour's. */
    for (int i = 0; i < SENDRECV_INTS; i++)
        in[i] = rank * SENDRECV_INTS + i;
    MPI_Sendrecv(in, SENDRECV_INTS, MPI_INT, right, 2, out, SENDRECV_INTS, MPI_INT, left, 2,
                 MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    for (int i = 0; i < SENDRECV_INTS; i++)
        if (out[i] != left * SENDRECV_INTS + i)
            fail(rank, "sendrecv", i, out[i], (long long)left * SENDRECV_INTS + i);

    MPI_Barrier(MPI_COMM_WORLD);
    printf("rank %d of %d: ring ok, allreduce ok, sendrecv ok\n", rank, size);
    free(in);
    free(out);
    MPI_Finalize();
    return 0;
}
