/**
 * Every page of a listing, in order: `list` is called with an empty token,
 * then with each page's next_page_token until one is empty.
 */
export async function everyPage<R extends { readonly nextPageToken: string }>(
  list: (pageToken: string) => Promise<R>,
): Promise<R[]> {
  const pages: R[] = [];
  let pageToken = "";
  do {
    const page = await list(pageToken);
    pages.push(page);
    pageToken = page.nextPageToken;
  } while (pageToken !== "");
  return pages;
}
